"""The seed's pattern 1: insert the row, then write SpiceDB, in the request.

No durability: if the process dies or SpiceDB is down between the two, the user is half-written.
"""

from __future__ import annotations

from datetime import datetime

from bench.context import BenchContext
from bench.rows import INSERT_ROW, mark_synced, row_args, row_completions, write_memberships
from spicesync.models import CreateUserInput

__all__ = ["DualWriteSystem"]


class DualWriteSystem:
    """Both writes in the caller's request: the fastest, and the one that loses users."""

    name = "dual write (no durability)"
    has_rows = True
    uses_temporal = False  # the dev server is not one of its processes (CPU accounting)

    def worker_command(self) -> list[str] | None:
        """No worker: the request does everything."""
        return None

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """Insert, write SpiceDB, record the token: the caller waits for all three."""
        await ctx.pool.execute(INSERT_ROW, *row_args(user))
        token = await write_memberships(ctx.spicedb, [(user.user_id, user.org_id, user.role)])
        await mark_synced(ctx.pool, [user.user_id], token)

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """From the rows."""
        return await row_completions(ctx, user_ids)
