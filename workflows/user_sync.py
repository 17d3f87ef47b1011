"""The per-user sync: one long-lived workflow per user applies that user's events in order.

Events (created, role_changed, moved, deleted) arrive through the ``submit`` update, usually as
update-with-start, so the first event of a user starts its workflow and later ones join it. The
workflow applies one event at a time, lowest version first; an event not newer than what is
applied is a recorded no-op, and a duplicate event id gets the first delivery's outcome. Users
never wait on each other: each has its own workflow, and a user whose event fails for good has
that event compensated and recorded as failed, then carries on.

Applying an event is a small saga: read the prior state (kept in history), write SpiceDB in one
atomic compare-and-set call, then record the event on the App DB row. A permanent failure (or
cancellation) restores exactly the prior state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.types import MethodAsyncSingleParam, ParamType, ReturnType
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.memberships import MembershipActivities
    from activities.user_rows import UserRowActivities
    from spicesync.constants import ACTIVITY_START_TO_CLOSE, HELD_CHANGE_GRACE
    from spicesync.errors import NON_RETRYABLE_ERROR_TYPES, InvalidUserInput
    from spicesync.ledger import EventLedger
    from spicesync.models import (
        ApplyRowInput,
        CarriedState,
        EventOutcome,
        InsertCreatedRowInput,
        Membership,
        MembershipsSnapshot,
        ReadMembershipsInput,
        ReadUserStateInput,
        ResumeInput,
        ResumeResult,
        SubmitEventInput,
        UndoCreatedRowInput,
        UserEvent,
        UserState,
        UserSyncInput,
        WriteMembershipsInput,
    )
    from spicesync.validation import validate_event

__all__ = [
    "COMPENSATION_RETRY",
    "LAST_ERROR",
    "ORG_ID",
    "STAGE",
    "STAGE_SINCE",
    "STEP_RETRY",
    "USER_ID",
    "UserSyncWorkflow",
]

STAGE = SearchAttributeKey.for_keyword("SpicesyncStage")
STAGE_SINCE = SearchAttributeKey.for_datetime("SpicesyncStageSince")
LAST_ERROR = SearchAttributeKey.for_keyword("SpicesyncLastError")
USER_ID = SearchAttributeKey.for_keyword("SpicesyncUserId")
ORG_ID = SearchAttributeKey.for_keyword("SpicesyncOrgId")

# Forward steps: transient failures retry for as long as it takes (an outage shows up as a
# retrying activity, never as a lost event); typed business errors fail at once.
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)
# Compensation must finish whatever happens, so nothing is non-retryable there.
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
)
_TIMEOUT = timedelta(seconds=ACTIVITY_START_TO_CLOSE)


@workflow.defn
class UserSyncWorkflow:
    """All of one user's events, applied one at a time in version order."""

    def __init__(self) -> None:
        self._user_id = ""
        self._ledger: EventLedger | None = None
        self._rows_committed: set[str] = set()
        self._applied_this_run = 0
        self._events_per_run = 0
        self._parked = False
        self._accepted_at: dict[str, datetime] = {}

    @workflow.run
    async def run(self, request: UserSyncInput) -> None:
        """Apply events as they arrive; continue as new when the history grows long.

        Args:
            request: The user, and the state carried over from the previous run if any.
        """
        self._user_id = request.user_id
        self._events_per_run = request.events_per_run
        workflow.upsert_search_attributes([USER_ID.value_set(request.user_id)])
        if request.carried is not None:
            state, recent = request.carried.state, request.carried.recent_outcomes
        else:
            # A new run learns what is already applied from the App DB itself, so an event that
            # arrives after an earlier run ended is still judged stale or not correctly.
            state = await _step(
                UserRowActivities.read_user_state, ReadUserStateInput(user_id=request.user_id)
            )
            recent = []
        ledger = self._ledger = EventLedger(state, recent)
        self._stage("idle")
        self._applied_this_run = 0
        try:
            await self._serve(request, ledger)
        except (ActivityError, asyncio.CancelledError) as err:
            if not is_cancelled_exception(err):
                raise
            # Cancelled (an operator's "roll back this user"): the event in flight has been
            # compensated; every caller still waiting learns that its event did not apply.
            ledger.abandon("Cancelled", "the user's sync was cancelled; the event was rolled back")
            await workflow.wait_condition(workflow.all_handlers_finished)
            raise

    async def _serve(self, request: UserSyncInput, ledger: EventLedger) -> None:
        while True:
            holding = ledger.is_holding()
            try:
                await workflow.wait_condition(
                    lambda: (
                        ledger.next_ready() is not None
                        or ledger.is_holding() != holding  # noqa: B023 - read in this iteration only
                        or (not ledger.has_pending() and self._should_continue_as_new())
                    ),
                    # A durable timer either way: the grace of a held change, or idleness.
                    timeout=HELD_CHANGE_GRACE
                    if holding
                    else timedelta(seconds=request.idle_seconds),
                )
            except TimeoutError:
                if holding:
                    # A change to a user that does not exist, and no creation came in time.
                    ledger.expire_held()
                elif not ledger.has_pending() and workflow.all_handlers_finished():
                    # Idle: close. The next event starts a fresh run, which reads what is
                    # applied from the App DB, so nothing depends on this run staying open.
                    self._stage("closed_idle")
                    return
                continue
            event = ledger.next_ready()
            if event is None:
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not ledger.has_pending():
                    workflow.continue_as_new(
                        UserSyncInput(
                            user_id=request.user_id,
                            idle_seconds=request.idle_seconds,
                            events_per_run=request.events_per_run,
                            carried=CarriedState(
                                state=ledger.state, recent_outcomes=ledger.recent()
                            ),
                        )
                    )
                continue
            outcome, new_state = await self._apply(event, ledger.state)
            ledger.finish(event, outcome, new_state)
            accepted_at = self._accepted_at.pop(event.event_id, None)
            if outcome.status == "applied" and accepted_at is not None:
                workflow.metric_meter().create_histogram_timedelta(
                    "spicesync_time_to_permission",
                    "From an event's acceptance to both stores reflecting it",
                ).record(workflow.now() - accepted_at, {"kind": event.kind})
            self._applied_this_run += 1
            if new_state.org_id:
                workflow.upsert_search_attributes([ORG_ID.value_set(new_state.org_id)])
            self._stage(
                "idle" if outcome.status != "failed" else "failed", error=outcome.error_type
            )

    @workflow.update
    async def submit(self, request: SubmitEventInput) -> EventOutcome:
        """Deliver one event; return once it reached the stage the caller waits for.

        ``accepted`` returns as soon as the event is durably recorded, ``row`` once the App DB
        row reflects it, ``applied`` once both stores do (or it was found stale, or failed).
        """
        await workflow.wait_condition(lambda: self._ledger is not None)
        ledger = self._ledger
        assert ledger is not None
        event = request.event
        decided = ledger.offer(event)
        if decided is not None:
            return decided
        self._accepted_at.setdefault(event.event_id, workflow.now())
        if request.wait == "accepted":
            return EventOutcome(event_id=event.event_id, version=event.version, status="queued")
        await workflow.wait_condition(
            lambda: (
                ledger.outcome(event.event_id) is not None
                or (request.wait == "row" and event.event_id in self._rows_committed)
            )
        )
        final = ledger.outcome(event.event_id)
        if final is not None:
            return final
        return EventOutcome(event_id=event.event_id, version=event.version, status="row_committed")

    @submit.validator
    def _validate_submit(self, request: SubmitEventInput) -> None:
        # Rejected updates are not written to history: a malformed event leaves no trace.
        if request.event.user_id != self._user_id and self._user_id:
            raise ValueError("the event belongs to another user's workflow")
        validate_event(request.event)

    @workflow.update
    async def resume(self, _request: ResumeInput) -> ResumeResult:
        """Resume a sync parked on a schema mismatch, once the schema is fixed."""
        if not self._parked:
            return ResumeResult(resumed=False)
        self._parked = False
        return ResumeResult(resumed=True)

    async def _park(self, err: ActivityError) -> None:
        self._parked = True
        self._stage("parked", error=_cause_type(err))
        workflow.metric_meter().create_counter(
            "spicesync_parked", "Syncs parked until an operator resumes them"
        ).add(1)
        workflow.logger.error("sync parked until resumed: %s", _describe(err)[1])
        await workflow.wait_condition(lambda: not self._parked)

    def _should_continue_as_new(self) -> bool:
        return (
            self._applied_this_run >= self._events_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    async def _apply(self, event: UserEvent, prior: UserState) -> tuple[EventOutcome, UserState]:
        """Apply one event as a saga; returns its outcome and the user's state afterwards."""
        try:
            validate_event(event)
        except InvalidUserInput as err:
            return _failed(event, "InvalidUserInput", err.message), prior
        target = (
            None
            if event.kind == "deleted"
            else Membership(user_id=event.user_id, org_id=event.org_id, role=event.role)
        )
        row_created = False
        snapshot: MembershipsSnapshot | None = None
        write_started = False
        try:
            if event.kind == "created":
                self._stage("inserting_row")
                inserted = await _step(
                    UserRowActivities.insert_created_row, InsertCreatedRowInput(event=event)
                )
                if inserted.stale:
                    return EventOutcome(
                        event_id=event.event_id, version=event.version, status="stale"
                    ), prior
                row_created = inserted.created
                self._rows_committed.add(event.event_id)

            while True:
                try:
                    self._stage("reading_permissions")
                    snapshot = await _step(
                        MembershipActivities.read_memberships,
                        ReadMembershipsInput(user_id=event.user_id),
                    )
                    self._stage("writing_permissions")
                    write_started = True
                    written = await _step(
                        MembershipActivities.write_memberships,
                        WriteMembershipsInput(
                            user_id=event.user_id,
                            remove=[m for m in snapshot.memberships if m != target],
                            add=[target] if target is not None else [],
                            expected_marker=snapshot.marker,
                            remove_marker=snapshot.marker,
                            set_marker=event.version,
                            event_id=event.event_id,
                        ),
                    )
                    break
                except ActivityError as err:
                    # SpiceDB applies a write whole or not at all: a refusal landed nothing.
                    if _refused(err):
                        write_started = False
                    if _cause_type(err) != "SchemaMismatch":
                        raise
                    # The schema lacks what spicesync writes: only an operator can fix that, so
                    # park (no compensation, nothing retried blindly) until resumed.
                    await self._park(err)

            self._stage("recording_row")
            recorded = await _step(
                UserRowActivities.apply_row, ApplyRowInput(event=event, zed_token=written.zed_token)
            )
            self._rows_committed.add(event.event_id)
            if not recorded.applied:
                raise ApplicationError(
                    f"user {event.user_id}: the App DB already holds a newer version",
                    type="SupersededWrite",
                )
            state = (
                UserState(exists=False, version=event.version)
                if target is None
                else UserState(
                    exists=True, version=event.version, org_id=target.org_id, role=target.role
                )
            )
            return (
                EventOutcome(
                    event_id=event.event_id,
                    version=event.version,
                    status="applied",
                    zed_token=written.zed_token,
                ),
                state,
            )
        except (ActivityError, ApplicationError, asyncio.CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            self._stage("compensating")
            workflow.metric_meter().create_counter(
                "spicesync_compensations", "Events rolled back to their prior state"
            ).add(1, {"kind": event.kind})
            undo = asyncio.ensure_future(
                self._compensate(event, target, snapshot if write_started else None, row_created)
            )
            await _shielded(undo)
            if cancelled:
                raise
            error_type, message = _describe(err)
            return _failed(event, error_type, message), prior

    async def _compensate(
        self,
        event: UserEvent,
        target: Membership | None,
        prior: MembershipsSnapshot | None,
        row_created: bool,
    ) -> None:
        """Restore exactly the prior state, in reverse order; each step retries until done."""
        if prior is not None:
            # Put back precisely what the snapshot held: a grant that existed before the event
            # survives its rollback (SpiceDB issue #1903), one the event added goes away.
            await workflow.execute_activity_method(
                MembershipActivities.write_memberships,
                WriteMembershipsInput(
                    user_id=event.user_id,
                    remove=[target]
                    if target is not None and target not in prior.memberships
                    else [],
                    add=prior.memberships,
                    expected_marker=None,
                    remove_marker=event.version,
                    set_marker=prior.marker,
                    check_marker=False,
                    event_id=event.event_id,
                ),
                start_to_close_timeout=_TIMEOUT,
                retry_policy=COMPENSATION_RETRY,
            )
        if row_created:
            await workflow.execute_activity_method(
                UserRowActivities.undo_created_row,
                UndoCreatedRowInput(user_id=event.user_id, event_id=event.event_id),
                start_to_close_timeout=_TIMEOUT,
                retry_policy=COMPENSATION_RETRY,
            )

    def _stage(self, stage: str, *, error: str | None = None) -> None:
        # Kept current so the UI and `spicesync stuck` can find, e.g., every sync that has been
        # writing to SpiceDB for more than five minutes.
        updates: list[SearchAttributeUpdate[Any]] = [
            STAGE.value_set(stage),
            STAGE_SINCE.value_set(workflow.now()),
        ]
        if error is not None:
            updates.append(LAST_ERROR.value_set(error))
        workflow.upsert_search_attributes(updates)


def _step(
    activity: MethodAsyncSingleParam[Any, ParamType, ReturnType], arg: ParamType
) -> Awaitable[ReturnType]:
    """Run a forward step of the saga with its retry policy."""
    # WAIT_CANCELLATION_COMPLETED: on cancel, compensation must start only after an in-flight
    # write has really stopped, or the write could land after its undo.
    return workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=_TIMEOUT,
        retry_policy=STEP_RETRY,
        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    )


def _cause_type(err: ActivityError) -> str | None:
    return err.cause.type if isinstance(err.cause, ApplicationError) else None


def _refused(err: ActivityError) -> bool:
    cause = err.cause
    return isinstance(cause, ApplicationError) and cause.type in NON_RETRYABLE_ERROR_TYPES


def _describe(err: BaseException) -> tuple[str, str]:
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    return type(cause).__name__, str(cause)


def _failed(event: UserEvent, error_type: str, message: str) -> EventOutcome:
    return EventOutcome(
        event_id=event.event_id,
        version=event.version,
        status="failed",
        error_type=error_type,
        message=message,
    )


async def _shielded(task: asyncio.Future[None]) -> None:
    """Wait for ``task`` even if this workflow is cancelled again meanwhile."""
    while True:
        try:
            await asyncio.shield(task)
            return
        except asyncio.CancelledError:
            if task.done():
                task.result()
                return
