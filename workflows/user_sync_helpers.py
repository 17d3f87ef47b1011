"""The user sync's pure helpers: what an event does to the state, how a failure is described.

Kept out of :mod:`workflows.user_sync` and imported there through
``workflow.unsafe.imports_passed_through()``: the workflow sandbox re-executes the workflow's
own module for every new workflow instance (every user's first event), and a passed-through
module is executed once per process. So everything here must stay deterministic and free of
I/O, clocks and randomness: it runs as workflow code, but without the sandbox's run-time guard
against non-deterministic calls (the replay tests of tests/histories/ still cover it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from temporalio.exceptions import ActivityError, ApplicationError

from spicesync.errors import NON_RETRYABLE_ERROR_TYPES, WRITTEN_THEN_REFUSED_ERROR_TYPES
from spicesync.models import (
    EventOutcome,
    EventStatus,
    InsertCreatedRowResult,
    Membership,
    MembershipsSnapshot,
    UserEvent,
    UserState,
    WriteMembershipsResult,
)

if TYPE_CHECKING:
    from workflows.steps import StepRunner

__all__ = [
    "EarlyInsert",
    "MembershipWrite",
    "cause_type",
    "describe",
    "failed",
    "outcome",
    "predicted",
    "refused",
    "shielded",
    "state_after",
    "state_before",
    "target",
]


class EarlyInsert(NamedTuple):
    """A new run's first creation, inserted before its turn (``UserSyncWorkflow._first_state``).

    Here rather than in the workflow's module, which the sandbox executes again for every new
    instance: building a ``NamedTuple`` class is one of the costlier parts of that.
    """

    event: UserEvent
    # Its step runner: the insert made the event durable, so its later steps may run locally.
    steps: StepRunner
    # The insert's result, or its refusal (raised again when the event's turn comes).
    outcome: InsertCreatedRowResult | ActivityError


@dataclass
class MembershipWrite:
    """One event's SpiceDB write, as far as a rollback needs to know it."""

    snapshot: MembershipsSnapshot | None = None
    # A write was sent and not refused: it may have landed, so a rollback must restore.
    may_have_landed: bool = False
    # The snapshot is what SpiceDB was seen to hold (read, or checked by a write that went
    # through), not only predicted from the App DB: a prediction is restored only if the write
    # it guarded is found to have landed.
    seen: bool = False


def target(event: UserEvent) -> Membership | None:
    """The membership the user has after ``event`` (none after a deletion)."""
    if event.kind == "deleted":
        return None
    return Membership(user_id=event.user_id, org_id=event.org_id, role=event.role)


def state_after(event: UserEvent, written: WriteMembershipsResult) -> UserState:
    """The user's state once ``event`` is applied and its SpiceDB write ``written`` landed."""
    membership = target(event)
    return UserState(
        exists=membership is not None,
        version=event.version,
        org_id=membership.org_id if membership is not None else "",
        role=membership.role if membership is not None else "",
        applied_event=event.event_id,
        zed_token=None if membership is None else written.zed_token,
    )


def outcome(event: UserEvent, status: EventStatus, zed_token: str | None = None) -> EventOutcome:
    """The outcome recorded for ``event`` when it did not fail."""
    return EventOutcome(
        event_id=event.event_id, version=event.version, status=status, zed_token=zed_token
    )


def state_before(
    event: UserEvent, snapshot: MembershipsSnapshot | None, prior: UserState
) -> MembershipsSnapshot | None:
    """What a rollback of ``event`` restores in SpiceDB.

    Normally the snapshot read before the write. But if the snapshot already carries this
    event's own marker, an earlier attempt's write landed and the record of its steps was lost
    (a worker killed while the steps ran as local activities, which then run again): the
    snapshot shows the event, not what preceded it. Then what preceded it is what the App DB
    had applied before the event.
    """
    if snapshot is None or snapshot.marker != event.version:
        return snapshot
    return predicted(event.user_id, prior)


def predicted(user_id: str, state: UserState) -> MembershipsSnapshot:
    """What SpiceDB holds for a user whose App DB state is ``state``, if the two agree.

    Every write of a sync sets the marker to the version it applies and the memberships to that
    version's, so this holds unless something else wrote the user (a backfill, an app's own
    write, drift); a write conditional on it then learns what SpiceDB really holds.
    """
    return MembershipsSnapshot(
        memberships=[Membership(user_id=user_id, org_id=state.org_id, role=state.role)]
        if state.exists
        else [],
        marker=state.version or None,
    )


def cause_type(err: ActivityError) -> str | None:
    """The application error type an activity failed with, if it failed with one."""
    return err.cause.type if isinstance(err.cause, ApplicationError) else None


def refused(err: ActivityError) -> bool:
    """Whether the activity was refused with no write made (a non-retryable error but one)."""
    cause = err.cause
    return (
        isinstance(cause, ApplicationError)
        and cause.type in NON_RETRYABLE_ERROR_TYPES
        and cause.type not in WRITTEN_THEN_REFUSED_ERROR_TYPES
    )


def describe(err: BaseException) -> tuple[str, str]:
    """The error type and message recorded for a failed event."""
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    return type(cause).__name__, str(cause)


def failed(event: UserEvent, error_type: str, message: str) -> EventOutcome:
    """The outcome recorded for ``event`` when it failed for good."""
    return EventOutcome(
        event_id=event.event_id,
        version=event.version,
        status="failed",
        error_type=error_type,
        message=message,
    )


async def shielded(task: asyncio.Future[None]) -> None:
    """Wait for ``task`` even if this workflow is cancelled again meanwhile."""
    while True:
        try:
            await asyncio.shield(task)
            return
        except asyncio.CancelledError:
            if task.done():
                task.result()
                return
