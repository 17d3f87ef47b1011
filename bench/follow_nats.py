"""spicesync's follow mode fed by NATS JetStream, driven the way an application does.

The application owns its table (``follow_app/app.sql``) and writes it with plain SQL; after its
transaction commits it publishes a ``user.created``-style event (the seed's pattern 2) to a
JetStream stream. ``spicesync relay nats`` delivers the change to the user's workflow and a
``spicesync worker`` in follow mode (``follow_app/spicesync.toml``) brings SpiceDB in step.

Measured like the outbox-fed system: time-to-row from the application's row (``created_at``),
time-to-permission from spicesync's bookkeeping (``spicesync_followed_users.synced_at``).
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime
from typing import Any

import nats
import nats.js.errors
from nats.js.api import StreamConfig

from bench.context import BenchContext
from bench.follow_mode import MAPPING, SYNCED_QUERY, FollowOutboxSystem
from spicesync.models import CreateUserInput
from spicesync.temporal import workers_polling

__all__ = ["FollowNatsSystem"]

_INSERT_ACCOUNT = """
INSERT INTO bench_follow.accounts (account_id, email, full_name, team_id, is_admin)
VALUES ($1, $2, $3, $4, $5)
RETURNING row_version
"""
_DURABLE = "spicesync-relay"


def _names(run: str) -> tuple[str, str]:
    return f"BENCH_FOLLOW_{run}", f"bench.{run}.follow.users"


class FollowNatsSystem:
    """The app's own row, then a JetStream publish; ``relay nats`` and a follow-mode worker."""

    name = "spicesync follow (NATS relay)"
    uses_nats = True  # the NATS server is one of its processes (CPU accounting)
    has_rows = True
    synced_query = SYNCED_QUERY

    def __init__(self) -> None:
        self._nc: Any = None
        self._js: Any = None
        self._tables = FollowOutboxSystem()

    def worker_command(self) -> list[str]:
        """The real worker; the mapping in its environment puts it in follow mode."""
        return [sys.executable, "-m", "spicesync", "worker"]

    def relay_command(self) -> list[str]:
        """The real NATS relay."""
        return [sys.executable, "-m", "spicesync", "relay", "nats"]

    def process_env(self, ctx: BenchContext) -> dict[str, str]:
        """The worker's and the relay's environment beyond the cell's engines."""
        assert ctx.nats_url is not None
        stream, subject = _names(ctx.run)
        # No relay metrics or health endpoint: their default ports may be taken on the machine.
        return {
            "SPICESYNC_CONFIG": str(MAPPING),
            "SPICESYNC_NATS_URL": ctx.nats_url,
            "SPICESYNC_NATS_STREAM": stream,
            "SPICESYNC_NATS_SUBJECTS": subject,
            "SPICESYNC_NATS_DURABLE": _DURABLE,
            "SPICESYNC_NATS_CREATE": "true",
            "SPICESYNC_NATS_METRICS_ADDRESS": "",
            "SPICESYNC_NATS_HEALTH_ADDRESS": "",
        }

    async def prepare(self, ctx: BenchContext) -> None:
        """Empty the app's table; a stream of the cell's own (the relay adds its consumer)."""
        await self._tables.prepare(ctx)
        assert ctx.nats_url is not None
        self._nc = await nats.connect(ctx.nats_url)
        self._js = self._nc.jetstream()
        stream, subject = _names(ctx.run)
        await self._js.add_stream(StreamConfig(name=stream, subjects=[subject]))

    async def close(self, ctx: BenchContext) -> None:
        """Drop the stream."""
        if self._js is not None:
            await self._js.delete_stream(_names(ctx.run)[0])
        if self._nc is not None:
            await self._nc.close()

    async def ready(self, ctx: BenchContext) -> bool:
        """A worker polls the cell's queue and the relay has its consumer."""
        try:
            await self._js.consumer_info(_names(ctx.run)[0], _DURABLE)
        except nats.js.errors.NotFoundError:
            return False
        return await workers_polling(ctx.client, ctx.task_queue) > 0

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """The application's row, then its event, acked by JetStream (durably stored)."""
        version = await ctx.pool.fetchval(
            _INSERT_ACCOUNT,
            uuid.UUID(user.user_id),
            user.email,
            user.name,
            user.org_id,
            user.role == "admin",
        )
        event = {"event_type": "user.created", "user_id": user.user_id, "version": version}
        await self._js.publish(_names(ctx.run)[1], json.dumps(event).encode())

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """The row's ``created_at`` and the bookkeeping's ``synced_at`` of every synced user."""
        return await self._tables.completions(ctx, user_ids)
