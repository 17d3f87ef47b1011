"""How the per-user saga runs its forward steps: locally while that is safe, otherwise visibly.

A local activity skips the activity task's round trip through the server, which is most of a
healthy sync's latency. But it runs *inside* the workflow task, and two things follow:

* **Nothing the task decides is durable until it completes.** An update's acceptance is
  recorded only then. A write made by a local step of the same workflow task is a side effect of
  an event Temporal may still lose: if the worker dies, or the task times out behind a backlog,
  the update is never accepted, the caller is told it failed, and the write stays behind with
  nothing to finish or undo it. So the first write of an update's event runs as a normal
  activity: scheduling it completes the workflow task, which records the acceptance and the
  schedule together. Reads may run locally at any time (a lost read changes nothing), and once
  the first write has been scheduled the event is durable and later writes may run locally
  again. An event the ``deliver`` signal brought is in history before any worker sees it
  (``durable``), so all its writes may run locally: a lost task is run again from the signal.
* **A slow local step stretches the workflow task** (and a caller waiting for acceptance). Each
  local try is bounded, including its wait for a free local-activity slot; after one fails or
  times out, the rest of the event's steps run as normal activities, so a busy box turns slow
  steps into visible, retried activities instead of workflow tasks near their timeout.

Whatever fails a local try (an outage, a slow store) continues at once as a normal activity with
the step's retry policy, so a stuck sync is always a pending, retrying activity that the UI,
``spicesync stuck`` and the repair commands see, never retries hidden inside a workflow task.
Every step is idempotent, so running it again after an attempt that did land is harmless.
Just before a step runs as a normal activity the runner calls its ``on_visible`` hook (in the
same workflow task), so the sync writes the stage of the step that may now last (see
workflows/stages.py); steps that stay local write nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    is_cancelled_exception,
)
from temporalio.types import MethodAsyncSingleParam, ParamType, ReturnType
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from spicesync.constants import ACTIVITY_START_TO_CLOSE, LOCAL_STEP_TIMEOUT
    from spicesync.errors import NON_RETRYABLE_ERROR_TYPES
    from spicesync.retries import LOCAL_STEP_RETRY, STEP_RETRY

__all__ = [
    "CHECKED_WRITE_MARKERS",
    "DURABLE_ACCEPTANCE_PATCH",
    "INSERT_READS_STATE_PATCH",
    "LOCAL_STEPS_PATCH",
    "READ_IN_WRITE_PATCH",
    "RECORD_IN_WRITE_PATCH",
    "RELEASE_PATCH",
    "SIGNALLED_LOCAL_PATCH",
    "Patches",
    "StepRunner",
]

# Runs recorded before the forward steps were tried as local activities replay without them.
LOCAL_STEPS_PATCH = "local-activity-steps"
# Runs recorded before writes waited for the event's durable acceptance (and before a failed
# local try sent the rest of the event to normal activities) replay as they ran.
DURABLE_ACCEPTANCE_PATCH = "writes-after-durable-acceptance"

# Runs recorded before an event's SpiceDB write checked the state it predicted (instead of a
# read step before the write) replay with the read step.
READ_IN_WRITE_PATCH = "read-memberships-in-write"
# Runs recorded before the SpiceDB write recorded the event on the App DB row in its own
# transaction replay with the row recorded by a step of its own (``apply_row``).
RECORD_IN_WRITE_PATCH = "record-row-in-write"

# Runs recorded before a new run's first creation read the App DB state in its insert (instead of
# a read step before it) replay with the read step.
INSERT_READS_STATE_PATCH = "insert-reads-state"

# Runs recorded before an event delivered by the ``deliver`` signal (in history before any worker
# saw it) wrote locally from its first step replay with that first write a normal activity.
SIGNALLED_LOCAL_PATCH = "signalled-events-write-locally"

# Every run this release begins has every patch above (and the user workflow's own), and says so
# with this one marker instead of one per patch.
RELEASE_PATCH = "release-2026-12-04b"
# Earlier releases' markers, with the patches that came after each (asked one by one).
_EARLIER_RELEASES = {
    "release-2026-12-04": frozenset({SIGNALLED_LOCAL_PATCH}),
    "release-2026-12-03c": frozenset({INSERT_READS_STATE_PATCH, SIGNALLED_LOCAL_PATCH}),
    "release-2026-12-03b": frozenset(
        {RECORD_IN_WRITE_PATCH, INSERT_READS_STATE_PATCH, SIGNALLED_LOCAL_PATCH}
    ),
    "release-2026-12-03": frozenset(
        {
            READ_IN_WRITE_PATCH,
            RECORD_IN_WRITE_PATCH,
            INSERT_READS_STATE_PATCH,
            SIGNALLED_LOCAL_PATCH,
        }
    ),
}

# A run whose ``TemporalChangeVersion`` holds one of these checks SpiceDB under the row's lock
# before each event's write, so a backfill beside it needs no version marker to be safe.
CHECKED_WRITE_MARKERS = frozenset(
    {RELEASE_PATCH, READ_IN_WRITE_PATCH}
    | {marker for marker, later in _EARLIER_RELEASES.items() if READ_IN_WRITE_PATCH not in later}
)

_TIMEOUT = timedelta(seconds=ACTIVITY_START_TO_CLOSE)
_LOCAL_TIMEOUT = timedelta(seconds=LOCAL_STEP_TIMEOUT)


class Patches:
    """Which of the workflow's patches a run has, asked of Temporal as little as it can be.

    Each patch asked in a run that is not replaying records a marker and the SDK's upsert of
    ``TemporalChangeVersion``: eight history events for four patches, in every user's first run.
    A run begun by this release has them all and records one :data:`RELEASE_PATCH` marker
    instead. A run begun by an earlier release has no such marker (it is replaying when asked,
    at its start), so it is asked patch by patch, where that release asked, and replays
    unchanged; a run begun by a release that had a marker of its own is asked only for the
    patches that came later. Build it at the start of the run, before any patch is asked.
    """

    def __init__(self, *, ask: bool = True) -> None:
        """Ask which release began the run.

        Args:
            ask: ``False``: take every patch above without asking Temporal, for a workflow
                that guards its use of :class:`StepRunner` with a patch of its own (follow
                mode's sync), whose runs never took the older paths these patches kept.
        """
        # The patches this run's release marker does not stand for; None: no marker at all.
        self._after_release: frozenset[str] | None = None
        if not ask or workflow.patched(RELEASE_PATCH):
            self._after_release = frozenset()
            return
        for marker, later in _EARLIER_RELEASES.items():
            if workflow.patched(marker):
                self._after_release = later
                return

    def has(self, patch_id: str) -> bool:
        """Whether the run takes the code path that ``patch_id`` brought."""
        if self._after_release is not None and patch_id not in self._after_release:
            return True
        return workflow.patched(patch_id)


class StepRunner:
    """Runs the forward steps of one event (or one repair), in order."""

    def __init__(
        self,
        patches: Patches,
        on_visible: Callable[[str | None], None] | None = None,
        *,
        durable: bool = False,
        cancellation_type: ActivityCancellationType = (
            ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
        ),
    ) -> None:
        """Start an event's (or a repair's) steps, all healthy so far.

        Args:
            patches: The run's patches.
            on_visible: Called just before a step runs as a normal activity, with the error
                type of the local try that failed first (``None`` if none was made).
            durable: The event is in history already (a signal delivered it), so even its first
                write may run locally.
            cancellation_type: How a cancelled step ends. The default waits until an in-flight
                write has really stopped, so compensation never races it; a caller with nothing
                to compensate may stop at once (``TRY_CANCEL``).
        """
        self._patches = patches
        self._durable = durable and patches.has(SIGNALLED_LOCAL_PATCH)
        self._local = True
        self._on_visible = on_visible
        self._cancellation_type = cancellation_type

    async def read(
        self, activity: MethodAsyncSingleParam[Any, ParamType, ReturnType], arg: ParamType
    ) -> ReturnType:
        """Run a step that writes nothing: locally if the event's steps are healthy so far."""
        return await self._run(activity, arg, local=self._local)

    async def write(
        self, activity: MethodAsyncSingleParam[Any, ParamType, ReturnType], arg: ParamType
    ) -> ReturnType:
        """Run a step that writes: never locally before the event's acceptance is durable."""
        local = self._local and (self._durable or not self._patches.has(DURABLE_ACCEPTANCE_PATCH))
        # Scheduling a normal activity completes the workflow task: from here on the event is
        # recorded in history, whatever happens to this attempt.
        self._durable = True
        return await self._run(activity, arg, local=local)

    async def _run(
        self,
        activity: MethodAsyncSingleParam[Any, ParamType, ReturnType],
        arg: ParamType,
        *,
        local: bool,
    ) -> ReturnType:
        failed_locally: str | None = None
        if local and self._patches.has(LOCAL_STEPS_PATCH):
            try:
                return await workflow.execute_local_activity_method(
                    activity,
                    arg,
                    # Bounds the wait for a local-activity slot too, not only the run.
                    schedule_to_close_timeout=_LOCAL_TIMEOUT,
                    retry_policy=LOCAL_STEP_RETRY,
                    cancellation_type=self._cancellation_type,
                )
            except FailureError as err:
                if is_cancelled_exception(err):
                    raise
                refusal = _application_failure(err)
                if refusal is not None and refusal.type in NON_RETRYABLE_ERROR_TYPES:
                    # A local activity's failure reaches the workflow unwrapped; wrap it as a
                    # normal activity's is, so the saga handles a refusal the same either way.
                    raise _as_activity_error(activity, refusal) from refusal
                if self._patches.has(DURABLE_ACCEPTANCE_PATCH):
                    # The store is slow or down: the event's next steps would only stretch
                    # workflow tasks too, so they go straight to normal activities.
                    self._local = False
                failed_locally = _error_type(err)
        if self._on_visible is not None:
            self._on_visible(failed_locally)
        # WAIT_CANCELLATION_COMPLETED by default: on cancel, compensation must start only after
        # an in-flight write has really stopped, or the write could land after its undo.
        return await workflow.execute_activity_method(
            activity,
            arg,
            start_to_close_timeout=_TIMEOUT,
            retry_policy=STEP_RETRY,
            cancellation_type=self._cancellation_type,
        )


def _error_type(err: FailureError) -> str:
    refusal = _application_failure(err)
    if refusal is not None and refusal.type:
        return refusal.type
    cause = err.cause if isinstance(err, ActivityError) and err.cause is not None else err
    return type(cause).__name__


def _application_failure(err: FailureError) -> ApplicationError | None:
    if isinstance(err, ApplicationError):
        return err
    return err.cause if isinstance(err.cause, ApplicationError) else None


def _as_activity_error(activity: object, refusal: ApplicationError) -> ActivityError:
    name = getattr(activity, "__name__", "step")
    return ActivityError(
        f"local activity {name} refused: {refusal.message}",
        scheduled_event_id=0,
        started_event_id=0,
        identity="",
        activity_type=name,
        activity_id="",
        retry_state=None,
    )
