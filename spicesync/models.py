"""Inputs and results of the workflow, its update and its activities.

One model per thing, carried by ``pydantic_data_converter`` on client and worker alike. Field
types are deliberately plain: an event from any producer must decode, so that validation can
reject it with a clear error instead of failing the workflow task forever.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from spicesync.constants import EVENTS_PER_RUN

__all__ = [
    "ApplyRowInput",
    "ApplyRowResult",
    "CarriedState",
    "CreateUserInput",
    "EventOutcome",
    "EventStatus",
    "InsertCreatedRowInput",
    "InsertCreatedRowResult",
    "Membership",
    "MembershipsSnapshot",
    "ReadMembershipsInput",
    "ReadUserStateInput",
    "SubmitEventInput",
    "UndoCreatedRowInput",
    "UserEvent",
    "UserState",
    "UserSyncInput",
    "WaitStage",
    "WriteMembershipsInput",
    "WriteMembershipsResult",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CreateUserInput(_Model):
    """A ``user.created`` event: the user the app wants to exist in both stores."""

    user_id: str
    email: str
    name: str
    org_id: str
    role: str = "member"


class Membership(_Model):
    """``organization:<org_id>#<role>@user:<user_id>`` in SpiceDB."""

    user_id: str
    org_id: str
    role: str


class WriteMembershipsResult(_Model):
    """The ZedToken SpiceDB returned as ``written_at``."""

    zed_token: str


# --- Lifecycle events (one per-user workflow applies them in version order) -------------------

EventStatus = Literal["queued", "row_committed", "applied", "stale", "failed"]
WaitStage = Literal["accepted", "row", "applied"]


class UserEvent(_Model):
    """One lifecycle event of one user, as the app emits it.

    ``version`` is the user's version in the App DB after this change (monotonic per user).
    Every event except ``deleted`` carries the membership the user must have at that version
    (``org_id`` and ``role``), so an event that arrives after a newer one can be dropped without
    losing anything: the newer one already says where the user belongs.
    """

    event_id: str
    user_id: str
    version: int
    kind: str
    org_id: str = ""
    role: str = ""
    email: str = ""
    name: str = ""


class SubmitEventInput(_Model):
    """Input of the ``submit`` update: the event and how long the caller waits."""

    event: UserEvent
    wait: WaitStage = "applied"


class EventOutcome(_Model):
    """What became of one event (opaque ids and error codes only)."""

    event_id: str
    version: int
    status: EventStatus
    zed_token: str | None = None
    error_type: str | None = None
    message: str | None = None


class UserState(_Model):
    """What the App DB says about a user: the version applied and where the user belongs."""

    exists: bool
    version: int
    org_id: str = ""
    role: str = ""


class CarriedState(_Model):
    """State handed from one run of the per-user workflow to the next."""

    state: UserState
    recent_outcomes: list[EventOutcome] = []


class UserSyncInput(_Model):
    """Input of the per-user workflow; ``carried`` is set when it continues as new."""

    user_id: str
    # How long the workflow stays open with nothing to do before it closes.
    idle_seconds: float = 600.0
    # Events one run applies before it continues as new with a fresh history.
    events_per_run: int = EVENTS_PER_RUN
    carried: CarriedState | None = None


class ReadUserStateInput(_Model):
    """Read the user's row (or tombstone) from the App DB."""

    user_id: str


class ApplyRowInput(_Model):
    """Write the App DB side of an event, guarded by its version."""

    event: UserEvent
    zed_token: str


class ApplyRowResult(_Model):
    """``applied`` is false when the row already had this version or a newer one."""

    applied: bool


class UndoCreatedRowInput(_Model):
    """Compensation: delete the row only if ``event_id`` inserted it."""

    user_id: str
    event_id: str


class InsertCreatedRowInput(_Model):
    """Insert the row of a ``created`` event (pending until its permissions are written)."""

    event: UserEvent


class InsertCreatedRowResult(_Model):
    """``created``: this event inserted the row; ``stale``: a newer version already exists."""

    created: bool
    stale: bool


class ReadMembershipsInput(_Model):
    """Read the user's memberships and sync version marker from SpiceDB."""

    user_id: str


class MembershipsSnapshot(_Model):
    """The user's memberships and the version marker of the last sync that wrote them."""

    memberships: list[Membership]
    marker: int | None


class WriteMembershipsInput(_Model):
    """One atomic WriteRelationships: remove, add, and move the version marker.

    ``expected_marker`` is the marker the write requires to find (a precondition; ``None``
    means "no marker yet"), so a write retried from an older attempt can never land after a
    newer one (SpiceDB issue #1503). Compensation restores a prior state unconditionally
    (``check_marker=False``).
    """

    user_id: str
    remove: list[Membership]
    add: list[Membership]
    expected_marker: int | None
    set_marker: int | None
    remove_marker: int | None
    check_marker: bool = True
    event_id: str = ""


class ResumeInput(_Model):
    """Input of the ``resume`` update: an operator fixed what parked the sync."""


class ResumeResult(_Model):
    """``resumed`` is false when the sync was not parked."""

    resumed: bool
