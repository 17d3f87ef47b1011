"""spicesync itself, driven the way an application drives it."""

from __future__ import annotations

import sys
from datetime import datetime

from bench.context import BenchContext
from bench.rows import row_completions
from spicesync.models import CreateUserInput
from starters.user_events import WaitFor, create_user

__all__ = ["PipelineSystem"]


class PipelineSystem:
    """``create_user(..., wait=WaitFor.START)`` against ``spicesync worker`` processes."""

    name = "spicesync"
    has_rows = True

    def worker_command(self) -> list[str]:
        """The real worker command."""
        return [sys.executable, "-m", "spicesync", "worker"]

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """The app's call returns once Temporal durably accepted the event."""
        await create_user(user, wait=WaitFor.START, client=ctx.client, task_queue=ctx.task_queue)

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """From the rows: inserted by the saga's first step, synced by its last."""
        return await row_completions(ctx, user_ids)
