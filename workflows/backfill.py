"""Backfill: bring every App DB user that spicesync has never written into SpiceDB, in bulk.

Batches go in keyset order; the cursor lives in the workflow, so a crashed worker's batch is
simply written again (TOUCH, idempotent) and a long backfill continues as new with its cursor.
A rate limit is kept with durable timers between batches. Safe beside live syncs: see
``activities/backfill.py``.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.backfill import BackfillActivities
    from spicesync.models import (
        BackfillInput,
        BackfillPageInput,
        BackfillProgress,
        BackfillResult,
        CountBackfillInput,
    )
    from spicesync.retries import STEP_RETRY

__all__ = ["BackfillWorkflow"]


@workflow.defn
class BackfillWorkflow:
    """Write never-synced users batch by batch, at most ``max_rate`` users per second."""

    def __init__(self) -> None:
        self._progress = BackfillProgress()

    @workflow.query
    def progress(self) -> BackfillProgress:
        """Users scanned and written so far, and the total to do."""
        return self._progress

    @workflow.run
    async def run(self, request: BackfillInput) -> BackfillResult:
        """Backfill until no never-synced user is left after the cursor.

        Args:
            request: Batch size and rate limit; progress when continued as new.

        Returns:
            The figures: users and relationships written, and the rates.
        """
        if request.progress is None:
            total = await workflow.execute_activity_method(
                BackfillActivities.count_backfill_candidates,
                CountBackfillInput(),
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=STEP_RETRY,
            )
            self._progress = BackfillProgress(total=total)
        else:
            self._progress = request.progress
        p = self._progress
        info = workflow.info()
        request_id = f"backfill:{info.workflow_id}:{info.first_execution_run_id}"
        batches = 0
        while not p.done:
            if batches >= request.batches_per_run or info.is_continue_as_new_suggested():
                workflow.continue_as_new(request.model_copy(update={"progress": p}))
            began = workflow.now()
            batch = await workflow.execute_activity_method(
                BackfillActivities.backfill_batch,
                BackfillPageInput(
                    after_user_id=p.cursor, batch_size=request.batch_size, request_id=request_id
                ),
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=STEP_RETRY,
            )
            busy = (workflow.now() - began).total_seconds()
            p.busy_seconds += busy
            p.scanned += batch.scanned
            p.written_users += batch.written_users
            p.skipped += batch.skipped
            p.relationships_written += batch.relationships_written
            p.cursor = batch.next
            p.done = batch.next is None
            batches += 1
            pause = 0.0
            if request.max_rate > 0 and not p.done:
                # Pace the batches: this one should have taken at least size / rate seconds.
                pause = batch.scanned / request.max_rate - busy
                if pause > 0:
                    await workflow.sleep(timedelta(seconds=pause))
            p.elapsed_seconds += busy + max(pause, 0.0)
        return BackfillResult(
            progress=p,
            rows_scanned_per_second=_rate(p.scanned, p.elapsed_seconds),
            relationships_written_per_second=_rate(p.relationships_written, p.elapsed_seconds),
        )


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0
