"""Inputs and results of the workflow, its update and its activities.

One model per thing, carried by ``pydantic_data_converter`` on client and worker alike. Field
types are deliberately plain: an event from any producer must decode, so that validation can
reject it with a clear error instead of failing the workflow task forever.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "CreateUserInput",
    "CreateUserResult",
    "DeleteMembershipInput",
    "DeleteMembershipResult",
    "DeleteUserRowInput",
    "DeleteUserRowResult",
    "InsertUserRowInput",
    "InsertUserRowResult",
    "MarkUserSyncedInput",
    "MarkUserSyncedResult",
    "Membership",
    "Role",
    "RowCommittedInput",
    "RowCommittedResult",
    "SyncStatus",
    "WriteMembershipInput",
    "WriteMembershipResult",
]

Role = Literal["member", "admin"]
SyncStatus = Literal["pending", "synced"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CreateUserInput(_Model):
    """A ``user.created`` event: the user the app wants to exist in both stores."""

    user_id: str
    email: str
    name: str
    org_id: str
    role: str = "member"


class CreateUserResult(_Model):
    """Where the user ended up once the workflow closed successfully."""

    user_id: str
    status: SyncStatus
    zed_token: str
    row_created: bool


class RowCommittedInput(_Model):
    """Input of the ``row_committed`` update (it needs none; one model keeps the API stable)."""


class RowCommittedResult(_Model):
    """Answer of the ``row_committed`` update: the App DB row is committed."""

    user_id: str
    status: SyncStatus


class Membership(_Model):
    """``organization:<org_id>#<role>@user:<user_id>`` in SpiceDB."""

    user_id: str
    org_id: str
    role: str


class InsertUserRowInput(_Model):
    """Insert the user's row, owned by the run that inserts it."""

    user_id: str
    email: str
    name: str
    org_id: str
    role: str
    run_id: str


class InsertUserRowResult(_Model):
    """``created`` is true when this run (in this or an earlier attempt) inserted the row."""

    created: bool


class DeleteUserRowInput(_Model):
    """Compensation: delete the row only if ``run_id`` inserted it."""

    user_id: str
    run_id: str


class DeleteUserRowResult(_Model):
    """``deleted`` is false when there was nothing of this run's to delete."""

    deleted: bool


class MarkUserSyncedInput(_Model):
    """Record that the user's permissions are written, as of ``zed_token``."""

    user_id: str
    run_id: str
    zed_token: str


class MarkUserSyncedResult(_Model):
    """The row's new sync status."""

    status: SyncStatus


class WriteMembershipInput(_Model):
    """TOUCH the membership relationship."""

    membership: Membership


class WriteMembershipResult(_Model):
    """The ZedToken SpiceDB returned as ``written_at``."""

    zed_token: str


class DeleteMembershipInput(_Model):
    """Compensation: delete exactly this membership relationship."""

    membership: Membership


class DeleteMembershipResult(_Model):
    """The ZedToken SpiceDB returned as ``deleted_at``."""

    zed_token: str
