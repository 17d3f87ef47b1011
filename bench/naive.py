"""The two-activity workflow (naive) as a benchmark system, and its worker.

Run as ``python -m bench.naive`` it is that workflow's worker: the workflow of
:mod:`bench.naive_workflow` and the blocking activities of :mod:`bench.naive_activities` on a
thread pool, the SDK's other worker settings at their defaults.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Final

from temporalio.worker import Worker

from bench.context import BenchContext
from bench.naive_activities import naive_insert_row, naive_write_spicedb
from bench.naive_workflow import NaiveTwoActivityWorkflow
from bench.rows import row_completions
from spicesync.models import CreateUserInput
from spicesync.settings import load_settings
from spicesync.temporal import connect_temporal, workers_polling

__all__ = ["NaiveTwoActivitySystem"]

# Threads for the blocking activities; as many activities run at once as there are threads.
ACTIVITY_THREADS: Final = 16


class NaiveTwoActivitySystem:
    """A plain start of the two-activity workflow; its worker does the writes."""

    name = "two-activity workflow (naive)"
    has_rows = True

    def worker_command(self) -> list[str]:
        """The baseline's worker process."""
        return [sys.executable, "-m", "bench.naive"]

    async def ready(self, ctx: BenchContext) -> bool:
        """The worker polls the cell's queue."""
        return await workers_polling(ctx.client, ctx.task_queue) > 0

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """Start the workflow: the call returns once Temporal has recorded the start."""
        await ctx.client.start_workflow(
            NaiveTwoActivityWorkflow.run,
            user,
            id=f"bench-naive-{user.user_id}",
            task_queue=ctx.task_queue,
        )

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """From the rows: inserted by the first activity, marked synced by the second."""
        return await row_completions(ctx, user_ids)


async def _main() -> None:
    settings = load_settings()
    client = await connect_temporal(settings)
    with ThreadPoolExecutor(ACTIVITY_THREADS) as threads:
        async with Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[NaiveTwoActivityWorkflow],
            activities=[naive_insert_row, naive_write_spicedb],
            activity_executor=threads,
            max_concurrent_activities=ACTIVITY_THREADS,
        ):
            await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main())
