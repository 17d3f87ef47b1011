"""spicesync itself, driven the way an application drives it."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta

from bench.context import BenchContext
from bench.rows import row_completions
from spicesync.models import CreateUserInput
from starters.user_events import WaitFor, create_user

__all__ = ["ClosingPipelineSystem", "PipelineSystem", "UnsandboxedClosingPipelineSystem"]


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


class ClosingPipelineSystem(PipelineSystem):
    """The same with no idle time: each user's run closes in the task that applied its event.

    Run on request (``--systems``): a spicesync run otherwise closes ten idle minutes later,
    outside the window, so the two side by side show what that close costs and saves.
    """

    name = "spicesync (no idle time)"

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """As :meth:`PipelineSystem.submit`, with ``idle=timedelta(0)``."""
        await create_user(
            user,
            wait=WaitFor.START,
            client=ctx.client,
            task_queue=ctx.task_queue,
            idle=timedelta(0),
        )


class UnsandboxedClosingPipelineSystem(ClosingPipelineSystem):
    """No idle time, on workers with ``SPICESYNC_WORKFLOW_SANDBOX=false``.

    Run on request (``--systems``): the sandbox is on by default, and this shows in one run what
    the setting's trade (the sandbox's run-time guard for the worker's CPU) buys against the
    targets.
    """

    name = "spicesync (no idle time, no sandbox)"

    def process_env(self, ctx: BenchContext) -> dict[str, str]:
        """The worker runs every workflow outside the sandbox."""
        return {"SPICESYNC_WORKFLOW_SANDBOX": "false"}
