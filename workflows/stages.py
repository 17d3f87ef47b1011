"""The search attributes a user's sync keeps current, for the UI and ``spicesync stuck``.

Shared by owned mode's and follow mode's per-user workflows; values are opaque ids, stage names
and error types only.

Every upsert is a command the server applies and indexes into visibility, so a healthy sync
writes as few as it can (:class:`StageMarks`): the ids that find it, and a stage only while the
stage can be seen to last. A step that runs inside a workflow task (a local activity) is over
before anyone could look; one that runs as a normal activity may retry for as long as a store
is down, so its stage is written as it is scheduled.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate

from spicesync.constants import ORG_ID_ATTRIBUTE, USER_ID_ATTRIBUTE

__all__ = [
    "LAST_ERROR",
    "ORG_ID",
    "QUIET_STAGES_PATCH",
    "STAGE",
    "STAGE_SINCE",
    "USER_ID",
    "StageMarks",
    "set_stage",
]

STAGE = SearchAttributeKey.for_keyword("SpicesyncStage")
STAGE_SINCE = SearchAttributeKey.for_datetime("SpicesyncStageSince")
LAST_ERROR = SearchAttributeKey.for_keyword("SpicesyncLastError")
USER_ID = USER_ID_ATTRIBUTE
ORG_ID = ORG_ID_ATTRIBUTE

# Runs recorded before a healthy sync stopped writing every stage it passed through replay as
# they ran: each stage, id and org written at once, in its own upsert.
QUIET_STAGES_PATCH = "healthy-path-without-stage-upserts"

# Stages a sync rests in: closing or finishing work from one of them changes nothing to show.
_RESTING = ("idle", "closed_idle")


def set_stage(stage: str, *, error: str | None = None, clear_error: bool = False) -> None:
    """Record the stage the sync is in now (and the error that put it there, if any).

    Writes at once, in its own upsert; :class:`StageMarks` decides when that is needed.

    Args:
        stage: The stage's name (``ACTIVE_STAGES`` lists those where a sync can be stuck).
        error: The error type to show as ``SpicesyncLastError``.
        clear_error: Remove ``SpicesyncLastError`` (the failure it named is over).
    """
    updates: list[SearchAttributeUpdate[Any]] = [
        STAGE.value_set(stage),
        STAGE_SINCE.value_set(workflow.now()),
    ]
    if error is not None:
        updates.append(LAST_ERROR.value_set(error))
    elif clear_error:
        updates.append(LAST_ERROR.value_unset())
    workflow.upsert_search_attributes(updates)


class StageMarks:
    """What a sync shows in its search attributes, written only when it would change.

    The workflow names every stage it enters; a stage is written (``SpicesyncStage`` with
    ``SpicesyncStageSince``, and ``SpicesyncLastError`` where known) only when it can last:
    a step runs as a normal activity (:meth:`step_visible`), or the sync enters a stage that is
    trouble in itself (:meth:`mark`: parked, compensating, failed, reconciling). Finishing
    (:meth:`settle`) writes the resting stage only over a stage that was written, so
    ``spicesync stuck`` never sees a stale active stage. Ids (:meth:`identify`) and the resting
    stage wait for the next write, or for :meth:`flush`, which the workflow calls before it
    waits: what one workflow task changes goes out as one upsert.

    A run recorded before this (``legacy``) writes every call at once, as it did.
    """

    def __init__(self, *, legacy: bool, stage: str = "idle") -> None:
        """Start from what the run was started with (continue-as-new carries it over).

        Args:
            legacy: Write every call at once, in its own upsert (runs recorded before
                :data:`QUIET_STAGES_PATCH`).
            stage: The stage the run starts in (written only if a step makes it visible).
        """
        self._legacy = legacy
        started = workflow.info().typed_search_attributes
        self._written: dict[str, Any] = {
            key.name: started.get(key) for key in (STAGE, LAST_ERROR, USER_ID, ORG_ID)
        }
        self._pending: dict[str, SearchAttributeUpdate[Any]] = {}
        self._stage = stage

    @property
    def shown(self) -> str | None:
        """The stage written last, or queued to be (what the UI and ``spicesync stuck`` see)."""
        stage = self._written[STAGE.name]
        return stage if isinstance(stage, str) else None

    def identify(self, *, user_id: str | None = None, org_id: str | None = None) -> None:
        """Keep the ids that find the sync current (written with the next write, if changed).

        Args:
            user_id: The user's opaque id.
            org_id: The user's organization (empty or ``None``: left as it is).
        """
        if self._legacy:
            if user_id is not None:
                workflow.upsert_search_attributes([USER_ID.value_set(user_id)])
            if org_id:
                workflow.upsert_search_attributes([ORG_ID.value_set(org_id)])
            return
        if user_id is not None:
            self._want(USER_ID, user_id)
        if org_id:
            self._want(ORG_ID, org_id)

    def forget_org(self) -> None:
        """The user has no organization now (deleted): show none (written with the next write)."""
        if self._legacy or self._written[ORG_ID.name] is None:
            return
        self._pending[ORG_ID.name] = ORG_ID.value_unset()
        self._written[ORG_ID.name] = None

    def enter(self, stage: str) -> None:
        """The sync starts a step of ``stage``; written only if the step becomes visible.

        Args:
            stage: The step's stage, e.g. ``writing_permissions``.
        """
        self._stage = stage
        if self._legacy:
            set_stage(stage)

    def step_visible(self, error: str | None = None) -> None:
        """The current step is about to run as a normal activity: write its stage now.

        Called by :class:`workflows.steps.StepRunner` in the workflow task that schedules the
        activity, so the upsert goes out with the schedule, in no extra task.

        Args:
            error: The error type of the local try that failed, if one did.
        """
        if not self._legacy:
            self._write(self._stage, error=error)

    def mark(self, stage: str, *, error: str | None = None, clear_error: bool = False) -> None:
        """Enter a stage that matters in itself (parked, compensating, ...); written now.

        Args:
            stage: The stage.
            error: The error type to show as ``SpicesyncLastError``.
            clear_error: Remove ``SpicesyncLastError`` (the failure it named is over).
        """
        self._stage = stage
        if self._legacy:
            set_stage(stage, error=error, clear_error=clear_error)
            return
        self._write(stage, error=error, clear_error=clear_error)

    def settle(self, stage: str = "idle", *, clear_error: bool = False) -> None:
        """Work is done: show ``stage`` if a working or failed stage is showing.

        Queued, not written: the caller flushes before it waits (:meth:`flush`), so when
        more work starts in the same workflow task, its stage replaces the rest in one upsert.

        Args:
            stage: The resting stage (``idle``, or ``closed_idle`` as the run closes).
            clear_error: Remove ``SpicesyncLastError`` too, if the stage is written.
        """
        self._stage = stage
        if self._legacy:
            set_stage(stage, clear_error=clear_error)
            return
        if self.shown is None or self.shown in _RESTING:
            # Nothing was shown but rest (or nothing at all): there is nothing to take back.
            return
        self._write(stage, clear_error=clear_error, now=False)

    def flush(self, *, ids_alone: bool = True) -> None:
        """Write what is waiting, in one upsert (nothing if nothing changed).

        Args:
            ids_alone: Write waiting ids even if no stage waits with them; ``False`` lets them
                wait for the next stage written (or a later flush), e.g. while a run's first
                event is still being delivered.
        """
        if not self._pending or (not ids_alone and STAGE.name not in self._pending):
            return
        workflow.upsert_search_attributes(list(self._pending.values()))
        self._pending.clear()

    def _write(
        self,
        stage: str,
        *,
        error: str | None = None,
        clear_error: bool = False,
        now: bool = True,
    ) -> None:
        if stage != self._written[STAGE.name]:
            # The same stage again keeps its "since": the sync has been in it all along.
            self._want(STAGE, stage)
            self._pending[STAGE_SINCE.name] = STAGE_SINCE.value_set(workflow.now())
        if error is not None:
            self._want(LAST_ERROR, error)
        elif clear_error and self._written[LAST_ERROR.name] is not None:
            self._pending[LAST_ERROR.name] = LAST_ERROR.value_unset()
            self._written[LAST_ERROR.name] = None
        if now:
            self.flush()

    def _want(self, key: SearchAttributeKey[Any], value: Any) -> None:
        if self._written[key.name] != value:
            self._pending[key.name] = key.value_set(value)
            self._written[key.name] = value
