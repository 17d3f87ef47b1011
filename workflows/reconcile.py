"""Reconciliation: prove SpiceDB matches the App DB, and repair it where it does not.

One run scans both stores a page at a time (the App DB by keyset, then SpiceDB by its cursor),
classifies every difference (missing, mismatched, orphan), and repairs each drifted user through
that user's own workflow, so a repair takes its turn with the user's live events and never races
them. Additions are repaired as they are found; anything that deletes waits for the end of the
scan, and a run that would delete more than its prune cap deletes nothing and says so: an App DB
that looks empty because of a misconfiguration must not wipe SpiceDB.

Long scans continue as new with their cursors; a crashed worker's page is scanned again by the
next one, and a repeated repair request is answered from the user workflow's memory.

In follow mode (``ReconcileInput.follow``, docs/follow-mode.md) the same run scans the
application's table through the mapping and SpiceDB's managed relationships
(``activities/follow_reconcile.py``), and repairs by delivering a change to each drifted user's
workflow, which syncs level-triggered; the prune cap then weighs the relationships of users who
would be left with none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.follow_reconcile import FollowReconcileActivities
    from activities.reconcile import ReconcileActivities
    from spicesync.models import (
        CheckSchemaInput,
        DeliverRepairsInput,
        Drift,
        ReconcileInput,
        ReconcileProgress,
        ReconcileReport,
        RepairUsersInput,
        SaveReportInput,
        ScanAppDBPageInput,
        ScanFollowedRelationshipsInput,
        ScanFollowedRowsInput,
        ScanPageResult,
        ScanSpiceDBPageInput,
    )
    from spicesync.retries import STEP_RETRY

__all__ = ["REPAIR_BATCH", "SAMPLES_PER_KIND", "ReconcileWorkflow"]

# Users handed to one repair activity; it heartbeats after each.
REPAIR_BATCH = 100
SAMPLES_PER_KIND = 5

_SCAN_TIMEOUT = timedelta(minutes=5)
_SCAN_HEARTBEAT = timedelta(seconds=10)


@workflow.defn
class ReconcileWorkflow:
    """Scan, classify, repair (or only report, on a dry run)."""

    def __init__(self) -> None:
        self._progress = ReconcileProgress()

    @workflow.query
    def progress(self) -> ReconcileProgress:
        """Where the scan is and what it has found so far."""
        return self._progress

    @workflow.run
    async def run(self, request: ReconcileInput) -> ReconcileReport:
        """Reconcile the whole of both stores.

        Args:
            request: Dry run or apply, prune cap, page size; progress when continued as new.

        Returns:
            The report (also kept in the App DB's ``reconcile_reports``; in follow mode in
            ``spicesync_reconcile_reports``).
        """
        if request.progress is None:
            self._progress = ReconcileProgress(started_at=workflow.now().isoformat())
            check = (
                FollowReconcileActivities.check_follow_schema
                if request.follow
                else ReconcileActivities.check_schema_ready
            )
            await workflow.execute_activity_method(
                check,
                CheckSchemaInput(),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=STEP_RETRY,
            )
        else:
            self._progress = request.progress
        p = self._progress
        pages = 0
        while p.phase in ("app_db", "spicedb"):
            if pages >= request.pages_per_run or workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(request.model_copy(update={"progress": p}))
            began = workflow.now()
            if p.phase == "app_db":
                page = await self._scan_rows(request)
                p.rows_scanned += page.scanned
                p.app_db_scan_seconds += _seconds(workflow.now() - began)
                p.app_cursor = page.next
                if page.next is None:
                    p.phase = "spicedb"
            else:
                page = await self._scan_relationships(request)
                p.relationships_scanned += page.scanned
                p.spicedb_scan_seconds += _seconds(workflow.now() - began)
                p.spicedb_cursor = page.next
                if page.next is None:
                    p.phase = "prune"
            p.in_flight_skipped += page.in_flight
            # Rows whose id no workflow can have: unmappable, but never named (not opaque).
            p.found.unmappable += page.unusable_ids
            additions = self._take(page.drift, request.prune_cap)
            if additions and not request.dry_run:
                await self._repair(request, [d.user_id for d in additions])
            pages += 1

        cap_exceeded = p.deletions_planned > request.prune_cap
        if p.phase == "prune":
            if not request.dry_run and not cap_exceeded and p.deferred:
                await self._repair(request, [d.user_id for d in p.deferred])
            p.phase = "done"
        report = self._report(request, cap_exceeded)
        info = workflow.info()
        save = (
            FollowReconcileActivities.save_follow_report
            if request.follow
            else ReconcileActivities.save_report
        )
        await workflow.execute_activity_method(
            save,
            SaveReportInput(workflow_id=info.workflow_id, run_id=info.run_id, report=report),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=STEP_RETRY,
        )
        return report

    async def _scan_rows(self, request: ReconcileInput) -> ScanPageResult:
        """One page of the App DB's users (follow mode: of the application's table)."""
        p = self._progress
        if request.follow:
            return await _scan_page(
                FollowReconcileActivities.scan_followed_rows,
                ScanFollowedRowsInput(after_user_id=p.app_cursor, page_size=request.page_size),
            )
        return await _scan_page(
            ReconcileActivities.scan_app_db_page,
            ScanAppDBPageInput(
                after_user_id=p.app_cursor,
                page_size=request.page_size,
                unfinished_after_seconds=request.unfinished_after_seconds,
            ),
        )

    async def _scan_relationships(self, request: ReconcileInput) -> ScanPageResult:
        """One page of SpiceDB's relationships (follow mode: the managed ones)."""
        p = self._progress
        if request.follow:
            return await _scan_page(
                FollowReconcileActivities.scan_followed_relationships,
                ScanFollowedRelationshipsInput(
                    cursor=p.spicedb_cursor, page_size=request.page_size
                ),
            )
        return await _scan_page(
            ReconcileActivities.scan_spicedb_page,
            ScanSpiceDBPageInput(
                cursor=p.spicedb_cursor,
                page_size=request.page_size,
                unfinished_after_seconds=request.unfinished_after_seconds,
            ),
        )

    def _take(self, drift: list[Drift], prune_cap: int) -> list[Drift]:
        """Count and sample the page's drift; return the additions to repair now."""
        p = self._progress
        additions: list[Drift] = []
        deferred_ids = {d.user_id for d in p.deferred}
        for d in drift:
            if d.user_id in deferred_ids:
                continue  # found by both passes: counted once
            setattr(p.found, d.kind, getattr(p.found, d.kind) + 1)
            samples = p.samples.setdefault(d.kind, [])
            if len(samples) < SAMPLES_PER_KIND:
                samples.append(d.user_id)
            if d.deletions == 0:
                additions.append(d)
                continue
            p.deletions_planned += d.deletions
            # Beyond the cap nothing will be pruned, so there is no need to remember more.
            if p.deletions_planned <= prune_cap:
                p.deferred.append(d)
                deferred_ids.add(d.user_id)
        return additions

    async def _repair(self, request: ReconcileInput, user_ids: list[str]) -> None:
        p = self._progress
        began = workflow.now()
        info = workflow.info()
        request_id = f"reconcile:{info.workflow_id}:{info.first_execution_run_id}"
        for start in range(0, len(user_ids), REPAIR_BATCH):
            batch = user_ids[start : start + REPAIR_BATCH]
            if request.follow:
                done = await workflow.execute_activity_method(
                    FollowReconcileActivities.deliver_repairs,
                    DeliverRepairsInput(user_ids=batch),
                    start_to_close_timeout=timedelta(minutes=10),
                    heartbeat_timeout=timedelta(seconds=20),
                    retry_policy=STEP_RETRY,
                )
            else:
                done = await workflow.execute_activity_method(
                    ReconcileActivities.repair_users,
                    RepairUsersInput(request_id=request_id, user_ids=batch),
                    start_to_close_timeout=timedelta(minutes=10),
                    heartbeat_timeout=timedelta(seconds=20),
                    retry_policy=STEP_RETRY,
                )
            r = p.repairs
            r.delivered += done.delivered
            r.repaired += done.repaired
            r.consistent += done.consistent
            r.failed += done.failed
            r.removed_unfinished += done.removed_unfinished
            r.relationships_written += done.relationships_written
            r.failed_samples = (r.failed_samples + done.failed_samples)[:10]
        p.repair_seconds += _seconds(workflow.now() - began)

    def _report(self, request: ReconcileInput, cap_exceeded: bool) -> ReconcileReport:
        p = self._progress
        seconds = _seconds(workflow.now() - datetime.fromisoformat(p.started_at))
        total = p.found.total()
        source = "the mapped table" if request.follow else "the App DB"
        if cap_exceeded:
            message = (
                f"prune cap exceeded: the run would delete {p.deletions_planned} relationships,"
                f" the cap is {request.prune_cap}; nothing was deleted. Check that {source} is"
                " the right one, then run again with a higher --prune-cap."
            )
        elif total == 0:
            message = f"SpiceDB matches {source}"
        elif request.dry_run:
            message = f"{total} drifted users found, nothing changed"
        elif request.follow:
            message = (
                f"{total} drifted users found; {p.repairs.delivered} changes delivered to their"
                f" workflows (each syncs the user's row as it is now), {p.repairs.failed} failed"
            )
        else:
            message = (
                f"{total} drifted users found; {p.repairs.repaired} repaired,"
                f" {p.repairs.removed_unfinished} unfinished creations removed,"
                f" {p.repairs.consistent} already consistent when their turn came,"
                f" {p.repairs.failed} failed"
            )
        if p.found.unsynced:
            never = "synced" if request.follow else "wrote (inserted outside it)"
            message += (
                f". {p.found.unsynced} rows spicesync never {never}:"
                " `spicesync backfill` writes such rows in bulk"
            )
        return ReconcileReport(
            dry_run=request.dry_run,
            found=p.found,
            samples=p.samples,
            rows_scanned=p.rows_scanned,
            relationships_scanned=p.relationships_scanned,
            in_flight_skipped=p.in_flight_skipped,
            repairs=p.repairs,
            deletions_planned=p.deletions_planned,
            prune_cap=request.prune_cap,
            prune_cap_exceeded=cap_exceeded,
            rows_scanned_per_second=_rate(p.rows_scanned, p.app_db_scan_seconds),
            relationships_scanned_per_second=_rate(p.relationships_scanned, p.spicedb_scan_seconds),
            relationships_written_per_second=_rate(
                p.repairs.relationships_written, p.repair_seconds
            ),
            seconds=seconds,
            message=message,
        )


async def _scan_page(
    step: Callable[[Any, Any], Awaitable[ScanPageResult]], request: Any
) -> ScanPageResult:
    """Run one scan step (a page), in either mode."""
    return await workflow.execute_activity_method(
        step,
        request,
        start_to_close_timeout=_SCAN_TIMEOUT,
        # A page takes seconds; a dead worker's page is noticed and scanned again soon.
        heartbeat_timeout=_SCAN_HEARTBEAT,
        retry_policy=STEP_RETRY,
    )


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0
