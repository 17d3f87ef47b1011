"""The ceiling: a workflow that does nothing, on the same server with the same worker settings.

Run as ``python -m bench.ceiling`` it is that workflow's worker.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

from temporalio.worker import Worker

from bench.context import BenchContext
from bench.empty_workflow import EmptyWorkflow
from spicesync.models import CreateUserInput
from spicesync.settings import load_settings
from spicesync.temporal import connect_temporal
from workers.startup_heap import freeze_startup_heap

__all__ = ["EmptyWorkflowSystem"]


class EmptyWorkflowSystem:
    """Temporal's own round trip: start a workflow, the worker completes it."""

    name = "empty workflow (ceiling)"
    has_rows = False

    def worker_command(self) -> list[str]:
        """The worker process."""
        return [sys.executable, "-m", "bench.ceiling"]

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """Start the workflow (what an app's call would wait for)."""
        await ctx.client.start_workflow(
            EmptyWorkflow.run,
            user.user_id,
            id=f"bench-empty-{user.user_id}",
            task_queue=ctx.task_queue,
            request_eager_start=True,
        )

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """Close times from Temporal's visibility: the workflow round trip."""
        wanted = set(user_ids)
        found: dict[str, tuple[datetime | None, datetime]] = {}
        query = f"TaskQueue = '{ctx.task_queue}' AND ExecutionStatus = 'Completed'"
        for _ in range(40):
            async for execution in ctx.client.list_workflows(query):
                user_id = execution.id.removeprefix("bench-empty-")
                if user_id in wanted and execution.close_time is not None:
                    found[user_id] = (None, execution.close_time)
            if len(found) == len(wanted):
                break
            await asyncio.sleep(0.5)  # visibility is eventually consistent
        return found


async def _main() -> None:
    settings = load_settings()
    client = await connect_temporal(settings)
    worker = Worker(client, task_queue=settings.task_queue, workflows=[EmptyWorkflow])
    # As spicesync's worker does: the ceiling is the best a Python worker can do on this server,
    # so it must not carry a cost spicesync has shed.
    freeze_startup_heap()
    async with worker:
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main())
