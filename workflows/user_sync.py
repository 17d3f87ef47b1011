"""The per-user sync: one long-lived workflow per user applies that user's events in order.

Events (created, role_changed, moved, deleted) arrive through the ``submit`` update, usually as
update-with-start, so the first event of a user starts its workflow and later ones join it; a
caller that waits for nothing but durability sends the ``deliver`` signal instead, usually as
signal-with-start. The
workflow applies one event at a time, lowest version first; an event not newer than what is
applied is a recorded no-op, and a duplicate event id gets the first delivery's outcome. Users
never wait on each other: each has its own workflow, and a user whose event fails for good has
that event compensated and recorded as failed, then carries on.

Applying an event is a small saga: a creation first inserts its row (pending; a new run's first
creation reads the user's App DB state in that same step); then one step
writes SpiceDB in one atomic compare-and-set call, conditional on the prior state the workflow
predicts (kept in history; if SpiceDB holds another, that is recorded and planned from), and
records the event on the App DB row in the same PostgreSQL transaction. A permanent failure (or
cancellation) restores exactly the prior state. Runs begun by earlier releases read the prior
state and record the row in steps of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.memberships import MembershipActivities
    from activities.user_rows import UserRowActivities
    from spicesync.constants import (
        ACTIVITY_START_TO_CLOSE,
        DELIVER_EVENT_SIGNAL,
        HELD_CHANGE_GRACE,
    )
    from spicesync.errors import DuplicateEmail, EventIdConflict, InvalidUserInput
    from spicesync.models import (
        ApplyRowInput,
        CarriedState,
        DeliverEventInput,
        EventOutcome,
        InsertCreatedRowInput,
        InsertCreatedRowResult,
        Membership,
        MembershipsSnapshot,
        ReadMembershipsInput,
        ReadUserStateInput,
        ReconcileUserInput,
        ReconcileUserResult,
        RecordRepairInput,
        ResumeInput,
        ResumeResult,
        SubmitEventInput,
        UndoCreatedRowInput,
        UserEvent,
        UserState,
        UserSyncInput,
        WriteMembershipsInput,
        WriteMembershipsResult,
    )
    from spicesync.retries import COMPENSATION_RETRY
    from spicesync.validation import validate_event
    from workflows.ledger import EventLedger
    from workflows.stages import (
        LAST_ERROR,
        ORG_ID,
        QUIET_STAGES_PATCH,
        STAGE,
        STAGE_SINCE,
        USER_ID,
        StageMarks,
    )
    from workflows.steps import (
        INSERT_READS_STATE_PATCH,
        READ_IN_WRITE_PATCH,
        RECORD_IN_WRITE_PATCH,
        SIGNALLED_LOCAL_PATCH,
        Patches,
        StepRunner,
    )
    from workflows.user_sync_helpers import (
        EarlyInsert as _EarlyInsert,
        MembershipWrite as _MembershipWrite,
        cause_type as _cause_type,
        describe as _describe,
        failed as _failed,
        outcome as _outcome,
        predicted as _predicted,
        refused as _refused,
        shielded as _shielded,
        state_after as _state_after,
        state_before as _state_before,
        target as _target,
    )

__all__ = [
    "LAST_ERROR",
    "LEDGER_RULES_PATCH",
    "ORG_ID",
    "STAGE",
    "STAGE_SINCE",
    "USER_ID",
    "UserSyncWorkflow",
]


_TIMEOUT = timedelta(seconds=ACTIVITY_START_TO_CLOSE)


# Runs recorded before the ledger refused reused event ids and failed changes to a user that is
# gone at once replay with the ledger's old rules (EventLedger's ``legacy``).
LEDGER_RULES_PATCH = "ledger-event-id-conflicts"


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
        # Repairs asked for by reconciliation (tickets); all asked while one runs share the next.
        self._repairs_asked = 0
        self._repairs_done = 0
        self._last_repair: ReconcileUserResult | None = None
        self._repair_request_id = ""
        # A reconcile run that asks again (its activity was retried) gets the first answer.
        self._repair_results: dict[str, ReconcileUserResult] = {}
        self._marks: StageMarks | None = None
        self._takes_deliveries = True
        # Set once the run is cancelled: repairs asked from then on are answered at once.
        self._cancelled = False
        # Events delivered before the run knew the user's state (with its start, normally).
        self._arrived: list[UserEvent] = []
        # A new run's first creation, inserted (or refused) before the ledger existed.
        self._preinserted: _EarlyInsert | None = None
        # Events as the ``deliver`` signal brought them (in history before any worker saw them),
        # by event id, until applied: their first write needs no workflow task to be durable.
        self._signalled: dict[str, UserEvent] = {}

    @workflow.run
    async def run(self, request: UserSyncInput) -> None:
        """Apply events as they arrive; continue as new when the history grows long.

        Args:
            request: The user, and the state carried over from the previous run if any.
        """
        self._user_id = request.user_id
        self._events_per_run = request.events_per_run
        # Runs begun by a release before the ``deliver`` signal replay with it ignored, as that
        # release ignored it (the same release brought the quiet stages).
        patches = self._patches = Patches()
        self._takes_deliveries = patches.has(QUIET_STAGES_PATCH)
        marks = self._marks = StageMarks(
            legacy=not self._takes_deliveries,
            # Only a run that starts afresh reads the row; a stuck read shows as reading_row.
            stage="reading_row" if request.carried is None else "idle",
        )
        # Normally set with the start by the starter; otherwise it goes out with the first stage
        # written, or before the run first waits.
        marks.identify(user_id=request.user_id)
        if request.carried is not None:
            state, recent = request.carried.state, request.carried.recent_outcomes
        else:
            # A new run learns what is already applied from the App DB itself, so an event that
            # arrives after an earlier run ended is still judged stale or not correctly.
            try:
                state = await self._first_state(patches, marks)
            except (ActivityError, asyncio.CancelledError) as err:
                if not is_cancelled_exception(err):
                    raise
                # Cancelled before the user's state was known (the first insert's undo is done):
                # the events delivered meanwhile are waiting for a ledger; they get one that
                # fails them, so their callers learn it.
                refusing = self._ledger = EventLedger(UserState(exists=False, version=0))
                await self._abandon(refusing, refuse_later=True)
                raise
            recent = []
            if patches.has(SIGNALLED_LOCAL_PATCH):
                # The starter showed a creation's organization; the App DB has the last word
                # where it has seen the user (the creation may be stale, the user deleted).
                if state.exists:
                    marks.identify(org_id=state.org_id)
                elif state.version:
                    marks.forget_org()
        legacy = not patches.has(LEDGER_RULES_PATCH)
        ledger = self._ledger = EventLedger(state, recent, legacy=legacy)
        if self._preinserted is None:
            # (A creation already inserted is under way: its stage stays until it is applied.)
            marks.settle("idle")
        self._applied_this_run = 0
        try:
            await self._serve(request, ledger)
        except (ActivityError, asyncio.CancelledError) as err:
            if not is_cancelled_exception(err):
                raise
            # Cancelled (an operator's "roll back this user"): the event in flight has been
            # compensated; every caller still waiting learns that its event did not apply.
            # Cancelled before the first creation's turn came: its pending row goes too.
            await self._drop_preinserted()
            await self._abandon(ledger, refuse_later=True)
            raise

    async def _drop_preinserted(self, unless: UserEvent | None = None) -> None:
        """Undo the first creation's early insert unless ``unless`` is that creation.

        The insert ran before the run knew which events would come: one that arrives meanwhile
        may go first (a lower version, or a tie decided by event id), and then the creation is
        inserted again in its own turn, as any other.
        """
        pre = self._preinserted
        if pre is None or (unless is not None and unless.event_id == pre.event.event_id):
            return
        self._preinserted = None
        if isinstance(pre.outcome, InsertCreatedRowResult) and pre.outcome.created:
            await self._undo_insert(pre.event)

    async def _undo_insert(self, event: UserEvent) -> None:
        """Remove ``event``'s pending row (only its own), even if cancelled again meanwhile."""
        await _shielded(asyncio.ensure_future(self._compensate(event, None, None, True)))

    async def _abandon(self, ledger: EventLedger, *, refuse_later: bool = False) -> None:
        """Fail what is pending (and waiting repairs) as cancelled, once its callers have heard."""
        ledger.abandon(
            "Cancelled",
            "the user's sync was cancelled; the event was rolled back",
            refuse_later=refuse_later,
        )
        self._last_repair = ReconcileUserResult(action="failed", error_type="Cancelled")
        self._repairs_done = self._repairs_asked
        self._cancelled = True
        await workflow.wait_condition(workflow.all_handlers_finished)

    async def _first_state(self, patches: Patches, marks: StageMarks) -> UserState:
        """The user's App DB state, read before the run judges its first event.

        A new user's first event is its creation, delivered with the start: its insert reads the
        state in the same transaction (one step, and one workflow activation, fewer per new
        user). Any other first event, or a creation the App DB may already know, is judged after
        a read step of its own, as every run did before.
        """
        if patches.has(INSERT_READS_STATE_PATCH):
            # Deliveries that came with the start reach their handlers in this workflow task.
            await asyncio.sleep(0)
            first = self._first_creation()
            if first is not None:
                state = await self._insert_first(first, patches, marks)
                if state is not None:
                    return state
        return await StepRunner(patches, marks.step_visible).read(
            UserRowActivities.read_user_state, ReadUserStateInput(user_id=self._user_id)
        )

    def _first_creation(self) -> UserEvent | None:
        """The creation a user the App DB has never seen would apply first, if that is one."""
        probe = EventLedger(UserState(exists=False, version=0))
        for event in self._arrived:
            if event.user_id == self._user_id:
                probe.offer(event)
        first = probe.next_ready()
        if first is None or first.kind != "created":
            return None
        try:
            validate_event(first)
        except InvalidUserInput:
            return None  # refused in its turn, with nothing written
        return first

    async def _insert_first(
        self, event: UserEvent, patches: Patches, marks: StageMarks
    ) -> UserState | None:
        """Insert the first creation's row, reading the state first; ``None``: read it apart."""
        steps = self._steps_for(event, marks)
        marks.enter("inserting_row")
        try:
            result = await steps.write(
                UserRowActivities.insert_created_row,
                InsertCreatedRowInput(event=event, read_first=True),
            )
        except (ActivityError, asyncio.CancelledError) as err:
            if is_cancelled_exception(err):
                # The insert may have landed before it stopped: undo this event's pending row.
                await self._undo_insert(event)
                raise
            if isinstance(err, ActivityError) and _cause_type(err) == DuplicateEmail.__name__:
                # Refused by the insert itself, so the read before it found the user unseen:
                # the event fails with this refusal in its turn, with nothing written.
                self._preinserted = _EarlyInsert(event, steps, err)
                return UserState(exists=False, version=0)
            # Refused otherwise: read the state apart; the event meets the refusal in its turn.
            return None
        assert result.prior is not None
        if not result.skipped:
            self._preinserted = _EarlyInsert(event, steps, result)
        return result.prior

    def _forget_signalled(self, event: UserEvent) -> None:
        if self._signalled.get(event.event_id) == event:
            del self._signalled[event.event_id]

    def _steps_for(self, event: UserEvent, marks: StageMarks) -> StepRunner:
        """The step runner of ``event``; durable from its first step if a signal delivered it.

        Only the very content a signal delivered counts: an update's event with the same id and
        other content (refused as a conflict, or applied before the signal came) is not in
        history until a workflow task records its acceptance.
        """
        # A run begun before the deliver signal ignores it: its events come by update only.
        signalled = self._takes_deliveries and self._signalled.get(event.event_id) == event
        return StepRunner(self._patches, marks.step_visible, durable=signalled)

    async def _serve(self, request: UserSyncInput, ledger: EventLedger) -> None:
        marks = self._stage_marks()
        # Idle time zero: the run closes in the workflow task that finished its last event,
        # with no idle timer, and the next event starts a new run (docs/design.md#lifetimes).
        closes_at_once = request.idle_seconds <= 0

        def done() -> bool:
            return not ledger.has_pending() and workflow.all_handlers_finished()

        while True:
            if ledger.next_ready() is None and not self._repair_wanted():
                if closes_at_once and done():
                    await self._close_idle()
                    return
                # About to wait, perhaps past this workflow task: what the last event or repair
                # left queued (back to idle, its org) goes out now, in one upsert. Work that is
                # ready starts in this task instead, and its first stage goes out with it. Ids
                # changed by an event that showed no stage (it ran locally) go out alone; runs
                # begun before the starter set them waited for a stage.
                marks.flush(ids_alone=self._patches.has(SIGNALLED_LOCAL_PATCH))
            holding = ledger.is_holding()
            try:
                await workflow.wait_condition(
                    lambda: (
                        ledger.next_ready() is not None
                        or self._repair_wanted()
                        or ledger.is_holding() != holding  # noqa: B023 - read in this iteration only
                        or (not ledger.has_pending() and self._should_continue_as_new())
                        or (closes_at_once and done())
                    ),
                    # A durable timer either way: the grace of a held change, or idleness. A
                    # run that closes at once waits with no timer: an event, a repair or its
                    # last caller served wakes it.
                    timeout=HELD_CHANGE_GRACE
                    if holding
                    else None
                    if closes_at_once
                    else timedelta(seconds=request.idle_seconds),
                )
            except TimeoutError:
                if holding:
                    # A change to a user that does not exist, and no creation came in time.
                    ledger.expire_held()
                elif done():
                    await self._close_idle()
                    return
                continue
            if closes_at_once and done() and not self._repair_wanted():
                continue  # nothing ready either: it closes at the top of the loop
            event = ledger.next_ready()
            # The first creation's early insert stands only for that event, applied next.
            await self._drop_preinserted(unless=event)
            if event is None and self._repair_wanted():
                # Live events go first; a repair then reads what they left behind.
                ticket = self._repairs_asked
                self._last_repair = await self._repair(ledger)
                self._repairs_done = ticket
                self._settle("idle")
                continue
            if event is None:
                # Before continuing as new, let callers collect their outcomes; anything that
                # arrives meanwhile is served first.
                await workflow.wait_condition(
                    lambda: (
                        workflow.all_handlers_finished()
                        or ledger.has_pending()
                        or self._repair_wanted()
                    )
                )
                if workflow.all_handlers_finished() and not ledger.has_pending():
                    # The next run starts with this run's search attributes.
                    marks.flush()
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
            self._signalled.pop(event.event_id, None)
            ledger.finish(event, outcome, new_state)
            accepted_at = self._accepted_at.pop(event.event_id, None)
            if outcome.status == "applied" and accepted_at is not None:
                workflow.metric_meter().create_histogram_timedelta(
                    "spicesync_time_to_permission",
                    "From an event's acceptance to both stores reflecting it",
                ).record(workflow.now() - accepted_at, {"kind": event.kind})
            self._applied_this_run += 1
            marks.identify(org_id=new_state.org_id)
            if outcome.status == "failed":
                self._mark("failed", error=outcome.error_type)
            else:
                # Only over a stage that was shown (normally the event's first write), and
                # queued: it goes out with the org before the workflow waits, or gives way to
                # the next event's first stage in this same task.
                self._settle("idle")

    async def _close_idle(self) -> None:
        """Close the run: the next event starts a fresh one.

        A fresh run reads what is applied from the App DB, so nothing depends on this run
        staying open; what it alone remembered (failed events' outcomes) goes with it.
        """
        await self._drop_preinserted()
        self._settle("closed_idle")
        self._stage_marks().flush()

    @workflow.update
    async def submit(self, request: SubmitEventInput) -> EventOutcome:
        """Deliver one event; return once it reached the stage the caller waits for.

        ``accepted`` returns as soon as the event is durably recorded, ``row`` once the App DB
        row reflects it, ``applied`` once both stores do (or it was found stale, or failed).
        """
        arrived = workflow.now()
        ledger = await self._ledger_ready(request.event)
        event = request.event
        decided = self._offer(ledger, event, arrived)
        if decided is not None:
            return decided
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

    @workflow.signal(name=DELIVER_EVENT_SIGNAL)
    async def deliver(self, request: DeliverEventInput) -> None:
        """Take an event whose sender waits only until Temporal holds it durably.

        A signal cannot be refused, so what the ``submit`` validator would reject is decided
        here: an event addressed to another user is dropped, a malformed one fails when its
        turn comes (``_apply`` validates every event), a reused event id is counted and logged
        (opaque ids only); a later ``submit`` of the same event learns either outcome.
        """
        arrived = workflow.now()
        # Before the ledger wait: a new run's first creation is inserted while it waits.
        self._signalled.setdefault(request.event.event_id, request.event)
        ledger = await self._ledger_ready(request.event)
        event = request.event
        if not self._takes_deliveries or event.user_id != self._user_id:
            self._forget_signalled(event)
        if not self._takes_deliveries:
            # Workers must be upgraded before the apps that send this signal (docs/design.md).
            workflow.logger.warning(
                "event %s ignored: this run began on a release without the deliver signal",
                event.event_id,
            )
            return
        if event.user_id != self._user_id:
            workflow.logger.warning("dropped an event addressed to another user's workflow")
            return
        decided = self._offer(ledger, event, arrived)
        if decided is not None:
            # Stale, a duplicate or a conflict: decided at once, never applied from here.
            self._forget_signalled(event)
        if decided is not None and decided.error_type == EventIdConflict.__name__:
            workflow.metric_meter().create_counter(
                "spicesync_event_id_conflicts",
                "Deliveries that reused an event id for other content (not applied)",
            ).add(1)
            workflow.logger.warning(
                "event %s reused for other content; not applied", event.event_id
            )

    async def _ledger_ready(self, event: UserEvent) -> EventLedger:
        # Signal-with-start and update-with-start deliver before the run has read the user's
        # state; what arrives then may be the creation that reads it (``_first_state``).
        if self._ledger is None:
            self._arrived.append(event)
        await workflow.wait_condition(lambda: self._ledger is not None)
        assert self._ledger is not None
        return self._ledger

    def _offer(
        self, ledger: EventLedger, event: UserEvent, arrived: datetime
    ) -> EventOutcome | None:
        decided = ledger.offer(event)
        if decided is None:
            self._accepted_at.setdefault(event.event_id, arrived)
        return decided

    @workflow.update
    async def reconcile(self, request: ReconcileUserInput) -> ReconcileUserResult:
        """Make SpiceDB match the App DB for this user, in turn with the user's live events.

        Reconciliation repairs drift through here, so a repair never races a live sync: it runs
        between events and reads both stores afresh when its turn comes.
        """
        await workflow.wait_condition(lambda: self._ledger is not None)
        if (known := self._repair_results.get(request.request_id)) is not None:
            return known
        if self._cancelled:
            # Asked after the run was cancelled (it was waiting for the user's state, say).
            return ReconcileUserResult(action="failed", error_type="Cancelled")
        self._repair_request_id = request.request_id
        self._repairs_asked += 1
        ticket = self._repairs_asked
        await workflow.wait_condition(lambda: self._repairs_done >= ticket)
        assert self._last_repair is not None
        self._repair_results[request.request_id] = self._last_repair
        while len(self._repair_results) > 50:
            del self._repair_results[next(iter(self._repair_results))]
        return self._last_repair

    def _repair_wanted(self) -> bool:
        return self._repairs_asked > self._repairs_done

    async def _repair(self, ledger: EventLedger) -> ReconcileUserResult:
        """Rewrite the user's relationships to what the App DB says, if they differ.

        A row spicesync inserted for a creation that never finished is removed with whatever
        SpiceDB holds for the user: repairs run between events, so no accepted event of this
        user is in flight, and every accepted creation is finished or rolled back by the event
        itself. Such a row stands for an event Temporal never accepted (its caller was told the
        call failed), or for a sync an operator terminated.
        """
        self._mark("reconciling")
        steps = StepRunner(self._patches, self._stage_marks().step_visible)
        state = await steps.read(
            UserRowActivities.read_user_state, ReadUserStateInput(user_id=self._user_id)
        )
        ledger.refresh(state)
        unfinished = state.unfinished_creation
        target = (
            Membership(user_id=self._user_id, org_id=state.org_id, role=state.role)
            if state.exists
            else None
        )
        remove: list[Membership] = []
        add: list[Membership] = []

        def plan(snapshot: MembershipsSnapshot) -> WriteMembershipsInput | None:
            nonlocal remove, add
            remove = [m for m in snapshot.memberships if m != target]
            add = [target] if target is not None and target not in snapshot.memberships else []
            if not remove and not add:
                return None
            return WriteMembershipsInput(
                user_id=self._user_id,
                remove=remove,
                add=add,
                expected_marker=snapshot.marker,
                remove_marker=snapshot.marker,
                # A user that never existed keeps no marker; a deleted one keeps its deletion's
                # version, as a live delete leaves it.
                set_marker=state.version or None,
                event_id=self._repair_request_id,
            )

        try:
            written = await self._rewrite_memberships(steps, _MembershipWrite(), plan, staged=False)
        except ActivityError as err:
            # A refused write landed nothing (SpiceDB writes are atomic): nothing to undo.
            return ReconcileUserResult(
                action="failed", error_type=_cause_type(err) or "ActivityError"
            )
        token = written.zed_token if written is not None else None
        if unfinished is not None:
            # SpiceDB first, then the row: a crash in between leaves a row the next repair
            # finds again, never a relationship without its row.
            await steps.write(
                UserRowActivities.undo_created_row,
                UndoCreatedRowInput(user_id=self._user_id, event_id=unfinished),
            )
            return ReconcileUserResult(
                action="removed_unfinished", removed=len(remove), zed_token=token
            )
        if written is None:
            return ReconcileUserResult(action="consistent")
        if state.exists:
            await steps.write(
                UserRowActivities.record_repair,
                RecordRepairInput(
                    user_id=self._user_id, version=state.version, zed_token=written.zed_token
                ),
            )
        return ReconcileUserResult(
            action="repaired", removed=len(remove), added=len(add), zed_token=written.zed_token
        )

    @workflow.update
    async def resume(self, _request: ResumeInput) -> ResumeResult:
        """Resume a sync parked on a schema mismatch, once the schema is fixed."""
        if not self._parked:
            return ResumeResult(resumed=False)
        self._parked = False
        return ResumeResult(resumed=True)

    async def _park(self, err: ActivityError) -> None:
        self._parked = True
        self._mark("parked", error=_cause_type(err))
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
        target = _target(event)
        row_created = inserting = False
        write = _MembershipWrite()
        steps = self._steps_for(event, self._stage_marks())
        # The SpiceDB write records the event on the row in the same step (and transaction).
        one_step = self._patches.has(RECORD_IN_WRITE_PATCH)
        try:
            if event.kind == "created":
                pre = self._preinserted
                if pre is not None and pre.event.event_id == event.event_id:
                    # Inserted (durably accepted) before the run knew the user's state.
                    self._preinserted = None
                    steps = pre.steps
                    if isinstance(pre.outcome, ActivityError):
                        raise pre.outcome
                    inserted = pre.outcome
                else:
                    self._enter("inserting_row")
                    inserting = True
                    inserted = await steps.write(
                        UserRowActivities.insert_created_row, InsertCreatedRowInput(event=event)
                    )
                    inserting = False
                if inserted.stale:
                    return _outcome(event, "stale"), prior
                row_created = inserted.created
                self._rows_committed.add(event.event_id)
            written = await self._rewrite_memberships(
                steps,
                write,
                lambda snapshot: WriteMembershipsInput(
                    user_id=event.user_id,
                    remove=[m for m in snapshot.memberships if m != target],
                    add=[target] if target is not None else [],
                    expected_marker=snapshot.marker,
                    remove_marker=snapshot.marker,
                    set_marker=event.version,
                    event_id=event.event_id,
                    record=event if one_step else None,
                ),
                staged=True,
                # What SpiceDB holds when it matches the App DB: the write checks it as it
                # writes, instead of a read step before it (one activation less per event).
                predicted=_predicted(event.user_id, prior)
                if self._patches.has(READ_IN_WRITE_PATCH)
                else None,
            )
            assert written is not None  # an event always writes
            if not one_step:
                self._enter("recording_row")
                recorded = await steps.write(
                    UserRowActivities.apply_row,
                    ApplyRowInput(event=event, zed_token=written.zed_token),
                )
                if not recorded.applied:
                    self._rows_committed.add(event.event_id)
                    raise ApplicationError(
                        f"user {event.user_id}: the App DB already holds a newer version",
                        type="SupersededWrite",
                    )
            self._rows_committed.add(event.event_id)
            return _outcome(event, "applied", written.zed_token), _state_after(event, written)
        except (ActivityError, ApplicationError, asyncio.CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            if cancelled and inserting and self._patches.has(SIGNALLED_LOCAL_PATCH):
                # Cancelled inside the insert (a local one is interrupted, perhaps after its
                # commit): undo this event's row if it is there (only its own is deleted).
                row_created = True
            self._mark("compensating")
            workflow.metric_meter().create_counter(
                "spicesync_compensations", "Events rolled back to their prior state"
            ).add(1, {"kind": event.kind})
            restore = _state_before(event, write.snapshot, prior) if write.may_have_landed else None
            await _shielded(
                asyncio.ensure_future(
                    self._compensate(event, target, restore, row_created, seen=write.seen)
                )
            )
            if cancelled:
                raise
            error_type, message = _describe(err)
            return _failed(event, error_type, message), prior

    async def _rewrite_memberships(
        self,
        steps: StepRunner,
        write: _MembershipWrite,
        plan: Callable[[MembershipsSnapshot], WriteMembershipsInput | None],
        *,
        staged: bool,
        predicted: MembershipsSnapshot | None = None,
    ) -> WriteMembershipsResult | None:
        """Write what ``plan`` makes of the user's memberships, in one call.

        Without ``predicted`` the memberships are read first, a step of their own. With it, the
        plan starts from ``predicted`` and the write goes through only if SpiceDB holds exactly
        that (``only_if``); if not, it writes nothing and returns what SpiceDB holds, and the
        plan starts again from that. Either way the state a rollback restores is in history
        before any write that could change it.

        The write is compare-and-set on the version marker: if the marker moved meanwhile (a
        backfill wrote the user), plan again from a fresh state. A schema that lacks what
        spicesync writes parks the sync (only an operator can fix that) and tries again once
        resumed. Any other refusal is raised.

        Returns:
            The write's result; ``None`` if ``plan`` found nothing to write.
        """
        snapshot = predicted
        write.seen = predicted is None
        while True:
            if snapshot is None:
                if staged:
                    self._enter("reading_permissions")
                snapshot = await steps.read(
                    MembershipActivities.read_memberships,
                    ReadMembershipsInput(user_id=self._user_id),
                )
            write.snapshot = snapshot
            request = plan(snapshot)
            if request is None:
                return None
            if predicted is not None:
                request = request.model_copy(update={"only_if": snapshot})
            if staged:
                self._enter("writing_permissions")
            write.may_have_landed = True
            try:
                result = await steps.write(MembershipActivities.write_memberships, request)
            except ActivityError as err:
                if _refused(err):
                    # SpiceDB applies a write whole or not at all: a refusal landed nothing.
                    write.may_have_landed = False
                cause = _cause_type(err)
                if cause != "MarkerMoved" and cause != "SchemaMismatch":
                    raise
                if cause == "SchemaMismatch":
                    await self._park(err)
                if predicted is None:
                    snapshot = None  # read again; a conditional write reads for itself
                continue
            if result.found is None:
                write.seen = True  # the write went through only on exactly this snapshot
                return result
            # SpiceDB held something else: nothing was written; plan from what it holds.
            write.may_have_landed = False
            write.seen = True
            snapshot = result.found

    async def _compensate(
        self,
        event: UserEvent,
        target: Membership | None,
        prior: MembershipsSnapshot | None,
        row_created: bool,
        *,
        seen: bool = True,
    ) -> None:
        """Restore exactly the prior state, in reverse order; each step retries until done.

        ``prior`` not ``seen`` is a prediction that the write in flight would have checked: the
        write lands only on exactly that state and always with the event's marker, so SpiceDB is
        restored to it if it holds the event's marker, and left alone (it never changed) if not.
        """
        if prior is not None and not seen:
            held = await workflow.execute_activity_method(
                MembershipActivities.read_memberships,
                ReadMembershipsInput(user_id=event.user_id),
                start_to_close_timeout=_TIMEOUT,
                retry_policy=COMPENSATION_RETRY,
            )
            if held.marker != event.version:
                prior = None
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

    def _stage_marks(self) -> StageMarks:
        assert self._marks is not None  # set first thing in run()
        return self._marks

    def _enter(self, stage: str) -> None:
        """A step of ``stage`` starts: shown only if it runs as a normal activity."""
        self._stage_marks().enter(stage)

    def _mark(self, stage: str, *, error: str | None = None) -> None:
        """A stage that matters in itself (trouble, or a repair): shown now."""
        self._stage_marks().mark(stage, error=error)

    def _settle(self, stage: str) -> None:
        """Back to rest: shown only over a stage that was shown."""
        self._stage_marks().settle(stage)
