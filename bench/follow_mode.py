"""spicesync's follow mode fed by the transactional outbox, driven the way an application does.

The application owns its table (``follow_app/app.sql``) and writes it with plain SQL; in the same
transaction it inserts the user's id into ``spicesync_outbox`` (docs/follow-mode.md#outbox).
``spicesync relay outbox`` delivers the change to the user's workflow and a ``spicesync worker``
in follow mode (``follow_app/spicesync.toml``) brings SpiceDB in step. The mapping produces the
same relationships as owned mode, so the cell uses spicesync's own SpiceDB schema and the
benchmark's independent permission check.

Measured like the other systems that keep rows: time-to-row from the application's row
(``created_at``, its transaction's start), time-to-permission from spicesync's bookkeeping
(``spicesync_followed_users.synced_at``, written just after the SpiceDB write).
"""

from __future__ import annotations

import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Final

from bench.context import BenchContext
from spicesync.models import CreateUserInput
from spicesync.temporal import workers_polling
from workers.outbox_relay import LISTEN_APPLICATION_NAME

__all__ = [
    "APP_SQL",
    "CDC_PUBLICATION",
    "MAPPING",
    "SYNCED_QUERY",
    "ClosingFollowOutboxSystem",
    "FollowCdcSystem",
    "FollowOutboxSystem",
]

APP_SQL: Final = Path(__file__).with_name("follow_app") / "app.sql"
MAPPING: Final = Path(__file__).with_name("follow_app") / "spicesync.toml"

# The application's own write, then the one statement it adds (docs/follow-mode.md#outbox).
_INSERT_ACCOUNT: Final = """
INSERT INTO bench_follow.accounts (account_id, email, full_name, team_id, is_admin)
VALUES ($1, $2, $3, $4, $5)
RETURNING row_version
"""
_OUTBOX_INSERT: Final = "INSERT INTO spicesync_outbox (user_id, version) VALUES ($1, $2)"
# For harness.wait_done: how many of the users ($1, uuid[]) spicesync has synced.
SYNCED_QUERY: Final = """
SELECT count(*) FROM spicesync_followed_users
WHERE user_id = ANY($1::uuid[]::text[]) AND status = 'synced'
"""
_COMPLETIONS: Final = """
SELECT a.account_id, a.created_at, f.synced_at
FROM bench_follow.accounts a
JOIN spicesync_followed_users f ON f.user_id = a.account_id::text
WHERE a.account_id = ANY($1::uuid[]) AND f.status = 'synced'
"""
_RELAY_LISTENING: Final = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1
"""


class FollowOutboxSystem:
    """The app's own row + an outbox row in one transaction; a relay and a follow-mode worker."""

    name = "spicesync follow (outbox relay)"
    has_rows = True
    synced_query = SYNCED_QUERY

    def worker_command(self) -> list[str]:
        """The real worker; the mapping in its environment puts it in follow mode."""
        return [sys.executable, "-m", "spicesync", "worker"]

    def relay_command(self) -> list[str]:
        """The real outbox relay."""
        return [sys.executable, "-m", "spicesync", "relay", "outbox"]

    def process_env(self, ctx: BenchContext) -> dict[str, str]:
        """The worker's and the relay's environment beyond the cell's engines."""
        # No relay metrics or health endpoint: their default ports may be taken on the machine.
        return {
            "SPICESYNC_CONFIG": str(MAPPING),
            "SPICESYNC_OUTBOX_METRICS_ADDRESS": "",
            "SPICESYNC_OUTBOX_HEALTH_ADDRESS": "",
        }

    async def prepare(self, ctx: BenchContext) -> None:
        """The application's table, and every table of this system emptied for the cell."""
        await ctx.pool.execute(APP_SQL.read_text(encoding="utf-8"))
        await ctx.pool.execute(
            "TRUNCATE bench_follow.accounts, spicesync_outbox, spicesync_followed_users"
        )

    async def close(self, ctx: BenchContext) -> None:
        """Nothing to release."""

    async def ready(self, ctx: BenchContext) -> bool:
        """A worker polls the cell's queue and the relay LISTENs for the outbox's NOTIFY."""
        listening = await ctx.pool.fetchval(_RELAY_LISTENING, LISTEN_APPLICATION_NAME)
        return bool(listening) and await workers_polling(ctx.client, ctx.task_queue) > 0

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """One transaction: the application's row and its outbox row, committed together."""
        async with ctx.pool.acquire() as conn, conn.transaction():
            version = await conn.fetchval(
                _INSERT_ACCOUNT,
                uuid.UUID(user.user_id),
                user.email,
                user.name,
                user.org_id,
                user.role == "admin",
            )
            await conn.execute(_OUTBOX_INSERT, user.user_id, version)

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """The row's ``created_at`` and the bookkeeping's ``synced_at`` of every synced user."""
        rows = await ctx.pool.fetch(_COMPLETIONS, [uuid.UUID(u) for u in user_ids])
        return {str(r["account_id"]): (r["created_at"], r["synced_at"]) for r in rows}


# The CDC system's publication; its slot is the cell's own (dropped when the cell closes).
CDC_PUBLICATION: Final = "bench_cdc"
_SLOT_EXISTS: Final = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1"
_DROP_SLOTS: Final = """
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
WHERE slot_name LIKE 'bench_cdc_%' AND database = current_database() AND NOT active
"""
_INSERT_PLAIN: Final = """
INSERT INTO bench_follow.accounts (account_id, email, full_name, team_id, is_admin)
VALUES ($1, $2, $3, $4, $5)
"""


class ClosingFollowOutboxSystem(FollowOutboxSystem):
    """The same, the relay starting users' runs with no idle time (run on request).

    Each run closes in the workflow task that finished its sync, inside the window, where the
    default closes ten idle minutes later, outside it.
    """

    name = "spicesync follow (outbox relay, no idle time)"

    def process_env(self, ctx: BenchContext) -> dict[str, str]:
        """The outbox system's environment, and ``SPICESYNC_FOLLOW_IDLE_SECONDS=0``."""
        return super().process_env(ctx) | {"SPICESYNC_FOLLOW_IDLE_SECONDS": "0"}


class FollowCdcSystem(FollowOutboxSystem):
    """The app's own row only, plain SQL; ``relay cdc`` reads it from the WAL (logical slot).

    Needs the App DB at ``wal_level = logical`` (the local stack's PostgreSQL is).
    """

    name = "spicesync follow (CDC relay)"

    def relay_command(self) -> list[str]:
        """The real CDC relay."""
        return [sys.executable, "-m", "spicesync", "relay", "cdc"]

    def process_env(self, ctx: BenchContext) -> dict[str, str]:
        """The mapping, a slot of the cell's own, no metrics or health endpoint."""
        return {
            "SPICESYNC_CONFIG": str(MAPPING),
            "SPICESYNC_CDC_SLOT": _slot(ctx),
            "SPICESYNC_CDC_PUBLICATION": CDC_PUBLICATION,
            "SPICESYNC_CDC_METRICS_ADDRESS": "",
            "SPICESYNC_CDC_HEALTH_ADDRESS": "",
        }

    async def prepare(self, ctx: BenchContext) -> None:
        """The table emptied before any slot of this cell exists (no truncate is read)."""
        await ctx.pool.execute(_DROP_SLOTS)
        await super().prepare(ctx)

    async def close(self, ctx: BenchContext) -> None:
        """Drop the cell's slot: a slot nobody reads keeps WAL."""
        await ctx.pool.execute(_DROP_SLOTS)

    async def ready(self, ctx: BenchContext) -> bool:
        """A worker polls the cell's queue and the relay has its slot."""
        has_slot = await ctx.pool.fetchval(_SLOT_EXISTS, _slot(ctx))
        return bool(has_slot) and await workers_polling(ctx.client, ctx.task_queue) > 0

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """The application's insert alone: nothing of spicesync's in its transaction."""
        await ctx.pool.execute(
            _INSERT_PLAIN,
            uuid.UUID(user.user_id),
            user.email,
            user.name,
            user.org_id,
            user.role == "admin",
        )


def _slot(ctx: BenchContext) -> str:
    return f"bench_cdc_{ctx.run}"
