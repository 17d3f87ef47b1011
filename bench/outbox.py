"""The seed's pattern 3: the row and an outbox row in one transaction, a relay that polls.

The relay writes SpiceDB and deletes what it wrote, or rolls back and tries again.

Written to be fair: the relay claims a batch with ``FOR UPDATE SKIP LOCKED`` (several relays can
run), writes the batch in one WriteRelationships, and polls every 20 ms when the outbox is empty.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import datetime

import asyncpg

from bench.context import BenchContext
from bench.rows import INSERT_ROW, mark_synced, row_args, row_completions, write_memberships
from spicesync.models import CreateUserInput
from spicesync.spicedb import connect_spicedb

__all__ = ["OUTBOX_DDL", "OutboxSystem"]

OUTBOX_DDL = """
CREATE TABLE IF NOT EXISTS bench_outbox (
    seq     bigserial PRIMARY KEY,
    user_id uuid NOT NULL,
    org_id  text NOT NULL,
    role    text NOT NULL
)
"""
_CLAIM = """
DELETE FROM bench_outbox WHERE seq IN (
    SELECT seq FROM bench_outbox ORDER BY seq FOR UPDATE SKIP LOCKED LIMIT 100
) RETURNING user_id, org_id, role
"""
_POLL_SECONDS = 0.02


class OutboxSystem:
    """Row + outbox row in one transaction; a relay process does SpiceDB."""

    name = "outbox + polling relay"
    has_rows = True
    uses_temporal = False  # the dev server is not one of its processes (CPU accounting)

    def worker_command(self) -> list[str]:
        """The relay process."""
        return [sys.executable, "-m", "bench.outbox"]

    async def prepare(self, ctx: BenchContext) -> None:
        """Create the outbox table."""
        await ctx.pool.execute(OUTBOX_DDL)

    async def close(self, ctx: BenchContext) -> None:
        """Nothing to release."""

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """One transaction: the row and its outbox entry."""
        async with ctx.pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT_ROW, *row_args(user))
            await conn.execute(
                "INSERT INTO bench_outbox (user_id, org_id, role) VALUES ($1, $2, $3)",
                uuid.UUID(user.user_id),
                user.org_id,
                user.role,
            )

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """From the rows."""
        return await row_completions(ctx, user_ids)


async def _relay() -> None:
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=2, max_size=4)
    assert pool is not None
    await pool.execute(OUTBOX_DDL)
    spicedb = connect_spicedb(os.environ["SPICEDB_ENDPOINT"], os.environ["SPICEDB_PRESHARED_KEY"])
    while True:
        try:
            async with pool.acquire() as conn, conn.transaction():
                claimed = await conn.fetch(_CLAIM)
                if claimed:
                    users = [(str(r["user_id"]), r["org_id"], r["role"]) for r in claimed]
                    token = await write_memberships(spicedb, users)
                    await mark_synced(conn, [u[0] for u in users], token)
        except Exception:
            # The hand-written retry: the transaction rolled back, the rows are claimed again.
            claimed = []
            await asyncio.sleep(1.0)
        if not claimed:
            await asyncio.sleep(_POLL_SECONDS)


if __name__ == "__main__":
    asyncio.run(_relay())
