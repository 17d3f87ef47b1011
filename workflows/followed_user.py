"""Follow mode's per-user workflow: keep one user's SpiceDB relationships in step with the row.

The application owns its users table; a change only says "user X changed" (the ``user_changed``
signal, usually signal-with-start, so delivering it is durable without waiting for a worker).
The workflow answers with a level-triggered sync (activities/followed_users.py): read the row as
it is now, write the difference to SpiceDB. One workflow per user, so a user's syncs never run
concurrently and users never wait on each other.

* Changes that arrive while a sync runs coalesce into one next sync: however many there were,
  one sync that starts after them sees them all.
* A sync runs first as a local activity, inside the workflow task that starts it, so a healthy
  sync costs no activity task and a run with no idle time closes in the task that began it. A
  local try that fails (a store slow or down) goes on as a normal activity with the step's
  retry policy, shown in the search attributes (workflows/steps.py). Running it locally before
  an update's acceptance is durable is safe here: the sync writes only what the row says now,
  under SpiceDB's marker precondition, so a sync whose task was lost is one that ran early.
* A change whose version is not newer than the version the last sync read needs no sync.
* ``sync_change`` (an update) delivers a change and waits until a sync that began after it has
  finished, for a caller that needs the ZedToken.
* A permanent failure (a row that maps to an invalid object id, SpiceDB refusing the write) is
  recorded in ``spicesync_followed_users`` and in the search attributes; the next change tries
  again. A schema mismatch parks the sync until an operator fixes the schema and sends
  ``resume``. Transient failures retry in the activity's RetryPolicy.
* Idle for ``idle_seconds`` (a durable timer), the workflow closes; the next change starts a
  new run. With ``idle_seconds`` zero it closes in the workflow task that finished its last
  sync, once its callers are answered, with no timer. After ``syncs_per_run`` syncs it
  continues as new, carrying :class:`FollowCarried`.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.followed_users import FollowedUserActivities
    from spicesync.constants import (
        ACTIVITY_START_TO_CLOSE,
        FOLLOWED_USER_WORKFLOW,
        SYNC_CHANGE_UPDATE,
        USER_CHANGED_SIGNAL,
    )
    from spicesync.mapping import valid_user_id
    from spicesync.models import (
        FollowCarried,
        FollowedUserInput,
        FollowSyncOutcome,
        RecordFollowFailureInput,
        ResumeInput,
        ResumeResult,
        SyncFollowedUserInput,
        SyncFollowedUserResult,
        UserChangedInput,
    )
    from spicesync.retries import STEP_RETRY
    from workflows.stages import QUIET_STAGES_PATCH, StageMarks
    from workflows.steps import Patches, StepRunner

__all__ = ["LOCAL_SYNC_PATCH", "FollowedUserWorkflow"]

# Runs recorded before a sync was tried as a local activity first replay with it a normal
# activity. A run with this marker has the quiet stages too (asked in its place, one marker).
LOCAL_SYNC_PATCH = "follow-sync-local-first"

_TIMEOUT = timedelta(seconds=ACTIVITY_START_TO_CLOSE)
# Outcomes kept for callers of ``sync_change`` still to collect theirs; one sync finishes per
# workflow task at most, and waiting callers read theirs in the task it finishes in.
_KEPT_OUTCOMES = 20


@workflow.defn(name=FOLLOWED_USER_WORKFLOW)
class FollowedUserWorkflow:
    """One followed user's syncs, one at a time, bursts of changes coalesced."""

    @workflow.init
    def __init__(self, request: FollowedUserInput) -> None:
        # Set before any handler runs: signal-with-start delivers the signal first.
        self._user_id = request.user_id
        carried = request.carried or FollowCarried()
        self._synced_version = carried.synced_version
        self._zed_token = carried.zed_token
        # Changes are numbered as they arrive; a sync covers every change numbered up to the
        # count when it began.
        self._requested = 1 if carried.pending else 0
        self._started = 0
        self._outcomes: list[tuple[int, FollowSyncOutcome]] = []
        self._position: str | None = None
        self._parked = False
        self._failed = False
        self._syncs_this_run = 0
        self._marks: StageMarks | None = None
        self._local_sync = False

    @workflow.run
    async def run(self, request: FollowedUserInput) -> None:
        """Sync whenever changes are pending; close when idle, continue as new when long.

        Args:
            request: The user, and what the previous run carried over, if any.
        """
        self._local_sync = workflow.patched(LOCAL_SYNC_PATCH)
        quiet = self._local_sync or workflow.patched(QUIET_STAGES_PATCH)
        marks = self._marks = StageMarks(legacy=not quiet)
        # Goes out with the first sync's stage: one upsert less for every run.
        marks.identify(user_id=request.user_id)
        marks.settle("idle")
        # Idle time zero: the run closes in the workflow task that finished its last sync, with
        # no idle timer; the next change starts a new run (docs/follow-mode.md#lifetimes).
        closes_at_once = request.idle_seconds <= 0

        def done() -> bool:
            return not self._pending() and workflow.all_handlers_finished()

        while True:
            if not self._pending():
                if closes_at_once and done():
                    self._close(marks)
                    return
                # About to wait, perhaps past this workflow task: the last sync's "idle" goes
                # out now. A sync that is due starts in this task, and replaces it in one upsert.
                # A local sync shows no stage for the ids to go out with: they go alone (only
                # for a run whose starter did not set them).
                marks.flush(ids_alone=self._local_sync)
            try:
                await workflow.wait_condition(
                    lambda: (
                        self._pending()
                        or self._should_continue_as_new(request)
                        or (closes_at_once and done())
                    ),
                    # A durable timer: idleness survives worker restarts. A run that closes at
                    # once waits with none: a change or its last caller answered wakes it.
                    timeout=None if closes_at_once else timedelta(seconds=request.idle_seconds),
                )
            except TimeoutError:
                if done():
                    self._close(marks)
                    return
                continue
            if self._pending():
                await self._sync()
                continue
            if closes_at_once and done():
                continue  # it closes at the top of the loop, not as a new run
            # Let callers collect their outcomes first; a change arriving meanwhile is synced.
            await workflow.wait_condition(
                lambda: workflow.all_handlers_finished() or self._pending()
            )
            if not self._pending():
                # The next run starts with this run's search attributes.
                marks.flush()
                workflow.continue_as_new(
                    FollowedUserInput(
                        user_id=request.user_id,
                        idle_seconds=request.idle_seconds,
                        syncs_per_run=request.syncs_per_run,
                        carried=FollowCarried(
                            synced_version=self._synced_version,
                            zed_token=self._zed_token,
                            pending=False,
                        ),
                    )
                )

    def _close(self, marks: StageMarks) -> None:
        """Close the run: the next change starts a fresh one."""
        # The next run reads the row as it is then: nothing depends on this run staying open.
        # A failed user stays visible.
        if not self._failed:
            # Written only over a stage that was shown: a run that closes idle stays "idle"
            # (its status says it closed).
            marks.settle("closed_idle")
        marks.flush()

    @workflow.signal(name=USER_CHANGED_SIGNAL)
    def user_changed(self, change: UserChangedInput) -> None:
        """A change of the user's row: sync soon (coalesced with any other pending change)."""
        if change.user_id != self._user_id:
            # A signal cannot be refused; a misaddressed one is dropped (opaque ids only).
            workflow.logger.warning("change for another user's workflow dropped")
            return
        self._offer(change)

    @workflow.update(name=SYNC_CHANGE_UPDATE)
    async def sync_change(self, change: UserChangedInput) -> FollowSyncOutcome:
        """Deliver a change and wait until a sync that began after it has finished.

        Returns:
            The sync's outcome (``synced``, ``unchanged`` or ``failed``), or ``skipped`` with
            the last sync's ZedToken when the change's version was already synced.
        """
        ticket = self._offer(change)
        if ticket is None:
            return FollowSyncOutcome(
                user_id=self._user_id,
                status="skipped",
                version=self._synced_version,
                zed_token=self._zed_token,
            )
        await workflow.wait_condition(lambda: self._covered(ticket) is not None)
        outcome = self._covered(ticket)
        assert outcome is not None
        return outcome

    @sync_change.validator
    def _validate_sync_change(self, change: UserChangedInput) -> None:
        # Rejected updates are not written to history.
        if change.user_id != self._user_id or not valid_user_id(change.user_id):
            raise ValueError("the change belongs to another user's workflow")

    @workflow.update
    async def resume(self, _request: ResumeInput) -> ResumeResult:
        """Resume a sync parked on a schema mismatch, once the schema is fixed."""
        if not self._parked:
            return ResumeResult(resumed=False)
        self._parked = False
        return ResumeResult(resumed=True)

    def _offer(self, change: UserChangedInput) -> int | None:
        """Number the change; ``None`` if its version is already synced (no sync needed)."""
        if (
            change.version is not None
            and self._synced_version is not None
            and change.version <= self._synced_version
        ):
            return None
        self._requested += 1
        if change.position is not None:
            self._position = change.position
        return self._requested

    def _pending(self) -> bool:
        return self._requested > self._started

    def _covered(self, ticket: int) -> FollowSyncOutcome | None:
        """The outcome of the first finished sync that began after change ``ticket``."""
        return next((o for covers, o in self._outcomes if covers >= ticket), None)

    def _should_continue_as_new(self, request: FollowedUserInput) -> bool:
        return (
            self._syncs_this_run >= request.syncs_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    async def _sync(self) -> None:
        """One sync covering every change numbered so far."""
        covers = self._started = self._requested
        marks = self._stage_marks()
        if self._local_sync:
            # Shown only if the sync goes on as a normal activity (StepRunner says when).
            marks.enter("syncing")
        else:
            # The sync is a normal activity, which retries as long as a store is down: shown.
            marks.mark("syncing")
        request = SyncFollowedUserInput(
            user_id=self._user_id, sync_id=str(workflow.uuid4()), position=self._position
        )
        while True:
            try:
                result = await self._run_sync(request)
            except ActivityError as err:
                if is_cancelled_exception(err):
                    # The run was cancelled (``spicesync repair rollback``): stop the sync, record
                    # nothing; the next change starts a new run that reads the row afresh.
                    raise
                cause = err.cause
                error_type = (cause.type if isinstance(cause, ApplicationError) else None) or type(
                    cause
                ).__name__
                if error_type == "SchemaMismatch":
                    await self._park(error_type)
                    continue
                message = cause.message if isinstance(cause, ApplicationError) else str(cause)
                if self._local_sync:
                    # A local try's refusal showed nothing; recording it is a normal activity
                    # that retries while PostgreSQL is down, and must be findable meanwhile.
                    self._stage_marks().step_visible(error_type)
                outcome = await self._record_failure(error_type, message)
                break
            self._synced_version = result.version if result.row_exists else None
            self._zed_token = result.zed_token
            self._failed = False
            outcome = FollowSyncOutcome(
                user_id=self._user_id,
                status=result.status,
                version=result.version,
                zed_token=result.zed_token,
            )
            self._stage_marks().settle("idle", clear_error=True)
            break
        workflow.metric_meter().create_counter(
            "spicesync_follow_syncs", "Syncs of followed users, by outcome"
        ).add(1, {"status": outcome.status})
        self._syncs_this_run += 1
        self._outcomes.append((covers, outcome))
        del self._outcomes[:-_KEPT_OUTCOMES]

    async def _run_sync(self, request: SyncFollowedUserInput) -> SyncFollowedUserResult:
        if self._local_sync:
            # durable: the sync only makes SpiceDB say what the row says now, so it may run
            # before the change that asked for it is in history (see the module's docstring).
            steps = StepRunner(
                Patches(ask=False),
                self._stage_marks().step_visible,
                durable=True,
                # Nothing to compensate: a cancelled run stops at once (an attempt still
                # running converges under the marker's precondition, like any late attempt).
                cancellation_type=ActivityCancellationType.TRY_CANCEL,
            )
            return await steps.write(FollowedUserActivities.sync_followed_user, request)
        return await workflow.execute_activity_method(
            FollowedUserActivities.sync_followed_user,
            request,
            start_to_close_timeout=_TIMEOUT,
            retry_policy=STEP_RETRY,
        )

    async def _record_failure(self, error_type: str, message: str) -> FollowSyncOutcome:
        """Record a permanent failure where operators look; nothing is rolled back."""
        await workflow.execute_activity_method(
            FollowedUserActivities.record_follow_failure,
            RecordFollowFailureInput(user_id=self._user_id, error_type=error_type, message=message),
            start_to_close_timeout=_TIMEOUT,
            retry_policy=STEP_RETRY,
        )
        # Unknown now: the next change must sync, whatever its version.
        self._synced_version = None
        self._failed = True
        self._stage_marks().mark("failed", error=error_type)
        return FollowSyncOutcome(
            user_id=self._user_id, status="failed", error_type=error_type, message=message
        )

    async def _park(self, error_type: str) -> None:
        self._parked = True
        self._stage_marks().mark("parked", error=error_type)
        workflow.metric_meter().create_counter(
            "spicesync_parked", "Syncs parked until an operator resumes them"
        ).add(1)
        workflow.logger.error(
            "sync parked until resumed: SpiceDB's schema lacks a managed relation"
        )
        await workflow.wait_condition(lambda: not self._parked)
        self._stage_marks().mark("syncing")

    def _stage_marks(self) -> StageMarks:
        assert self._marks is not None  # set first thing in run()
        return self._marks
