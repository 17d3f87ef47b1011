"""Backfill: bring every App DB user that spicesync has never written into SpiceDB, in bulk.

Batches go in keyset order; the cursor lives in the workflow, so a crashed worker's batch is
simply written again (TOUCH, idempotent) and a long backfill continues as new with its cursor.
A rate limit is kept with durable timers between batches. Safe beside live syncs: see
``activities/backfill.py``: the run first counts the user syncs that may write without checking
SpiceDB under the row's lock, and writes version markers only if there are any.

In follow mode (``BackfillInput.follow``, docs/follow-mode.md) the same run walks the
application's table in one lane and delivers a change to every user spicesync has never synced
(``activities/follow_backfill.py``); the users' workflows then sync them, and the rate limit
paces the deliveries.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.backfill import BackfillActivities
    from activities.follow_backfill import FollowBackfillActivities
    from spicesync.models import (
        BackfillInput,
        BackfillPageInput,
        BackfillPageResult,
        BackfillProgress,
        BackfillResult,
        CountBackfillInput,
        CountFollowedBackfillInput,
        CountUncheckedSyncsInput,
        FollowBackfillPageInput,
    )
    from spicesync.retries import STEP_RETRY
    from workflows.steps import CHECKED_WRITE_MARKERS

__all__ = ["BACKFILL_MARKERS_PATCH", "BackfillWorkflow"]

# Runs recorded before the backfill asked whether it needs version markers write them always.
BACKFILL_MARKERS_PATCH = "backfill-markers-only-if-needed"


@workflow.defn
class BackfillWorkflow:
    """Write never-synced users batch by batch, at most ``max_rate`` users per second."""

    def __init__(self) -> None:
        self._progress = BackfillProgress()
        self._request_id = ""
        self._batches = 0

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
        if request.follow:
            # The application's ids need not be UUIDs: one lane, in the table's id order.
            request = request.model_copy(update={"lanes": 1})
        if request.progress is None:
            if request.follow:
                total = await workflow.execute_activity_method(
                    FollowBackfillActivities.count_followed_backfill_candidates,
                    CountFollowedBackfillInput(),
                    start_to_close_timeout=timedelta(seconds=60),
                    retry_policy=STEP_RETRY,
                )
            else:
                total = await workflow.execute_activity_method(
                    BackfillActivities.count_backfill_candidates,
                    CountBackfillInput(),
                    start_to_close_timeout=timedelta(seconds=60),
                    retry_policy=STEP_RETRY,
                )
            self._progress = BackfillProgress(
                total=total, version_markers=await self._needs_version_markers(request)
            )
        else:
            self._progress = request.progress
        p = self._progress
        lanes = request.lanes
        if lanes > 1 and not p.lanes_done:
            # Lane i starts just below i/lanes of the id space (keyset: "id > cursor").
            p.lane_cursors = [None] + [str(_bound(i, lanes, -1)) for i in range(1, lanes)]
            p.lanes_done = [False] * lanes
        info = workflow.info()
        self._request_id = f"backfill:{info.workflow_id}:{info.first_execution_run_id}"
        self._batches = 0
        began = workflow.now()
        if lanes == 1:
            await self._lane(request, None)
        else:
            await asyncio.gather(*(self._lane(request, i) for i in range(lanes)))
        p.elapsed_seconds += (workflow.now() - began).total_seconds()
        p.done = all(p.lanes_done) if lanes > 1 else p.done
        if not p.done:
            workflow.continue_as_new(request.model_copy(update={"progress": p}))
        return BackfillResult(
            progress=p,
            rows_scanned_per_second=_rate(p.scanned, p.elapsed_seconds),
            relationships_written_per_second=_rate(p.relationships_written, p.elapsed_seconds),
        )

    async def _lane(self, request: BackfillInput, lane: int | None) -> None:
        """Write one lane's batches until it is done or this run has written its share."""
        p = self._progress
        upper = (
            str(_bound(lane + 1, request.lanes, 0))
            if lane is not None and lane + 1 < request.lanes
            else None
        )
        rate = request.max_rate / request.lanes
        while not (p.done if lane is None else p.lanes_done[lane]):
            if (
                self._batches >= request.batches_per_run
                or workflow.info().is_continue_as_new_suggested()
            ):
                return  # the run continues as new with every lane's cursor
            self._batches += 1
            began = workflow.now()
            after = p.cursor if lane is None else p.lane_cursors[lane]
            if request.follow:
                batch = await self._deliver(request, after)
            else:
                batch = await workflow.execute_activity_method(
                    BackfillActivities.backfill_batch,
                    BackfillPageInput(
                        after_user_id=after,
                        before_user_id=upper,
                        batch_size=request.batch_size,
                        request_id=self._request_id,
                        version_markers=p.version_markers,
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
            p.delivered += batch.delivered
            if lane is None:
                p.cursor = batch.next
                p.done = batch.next is None
                finished = p.done
            else:
                p.lane_cursors[lane] = batch.next
                p.lanes_done[lane] = batch.next is None
                finished = p.lanes_done[lane]
            if rate > 0 and not finished:
                # Pace the batches: this one should have taken at least size / rate seconds
                # (follow mode: the users it delivered to; a synced user costs nothing).
                pause = (batch.delivered if request.follow else batch.scanned) / rate - busy
                if pause > 0:
                    await workflow.sleep(timedelta(seconds=pause))

    async def _needs_version_markers(self, request: BackfillInput) -> bool:
        """Whether a user sync that does not check SpiceDB under the row's lock may be running.

        Follow mode writes no relationship itself (the users' workflows do): no markers.
        """
        if request.follow:
            return False
        if not workflow.patched(BACKFILL_MARKERS_PATCH):
            return True
        unchecked = await workflow.execute_activity_method(
            BackfillActivities.count_unchecked_syncs,
            CountUncheckedSyncsInput(
                task_queue=workflow.info().task_queue,
                checked_markers=sorted(CHECKED_WRITE_MARKERS),
            ),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=STEP_RETRY,
        )
        return unchecked > 0

    async def _deliver(self, request: BackfillInput, after: str | None) -> BackfillPageResult:
        """Follow mode's batch: deliver a change to each never-synced user of one page."""
        return await workflow.execute_activity_method(
            FollowBackfillActivities.deliver_backfill_batch,
            FollowBackfillPageInput(after_user_id=after, batch_size=request.batch_size),
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=timedelta(seconds=20),
            retry_policy=STEP_RETRY,
        )


def _bound(index: int, lanes: int, offset: int) -> uuid.UUID:
    """The id at ``index / lanes`` of the UUID space, plus ``offset``."""
    return uuid.UUID(int=(index * (1 << 128)) // lanes + offset)


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0
