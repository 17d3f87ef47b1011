"""Deliver user lifecycle events from application code.

Every event goes to its user's workflow (id ``user-<uuid>``) through update-with-start: the
first event of a user starts the workflow, later ones join it, duplicates get the first
delivery's outcome. Three ways to wait, for three kinds of caller:

* ``WaitFor.START``: return once Temporal has durably accepted the event;
* ``WaitFor.ROW``: return once the App DB row reflects it (for a creation: the seed's
  "201 Created" moment, before SpiceDB is written);
* ``WaitFor.PERMISSIONS``: return once SpiceDB reflects it too, with the ZedToken, so the
  caller's next permission check can ask for ``at_least_as_fresh`` that token.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict
from temporalio.client import Client, WithStartWorkflowOperation, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy

from spicesync.constants import user_workflow_id
from spicesync.errors import EventIdConflict
from spicesync.models import (
    CreateUserInput,
    EventOutcome,
    SubmitEventInput,
    UserEvent,
    UserSyncInput,
    WaitStage,
)
from spicesync.temporal import client_and_queue
from spicesync.validation import validate_event
from workflows.user_sync import UserSyncWorkflow

__all__ = [
    "SyncOutcome",
    "UserSyncFailed",
    "WaitFor",
    "change_role",
    "create_user",
    "creation_event",
    "delete_user",
    "move_user",
    "submit_event",
]


class WaitFor(enum.StrEnum):
    """How long a starter waits."""

    START = "start"
    ROW = "row"
    PERMISSIONS = "permissions"


_STAGE: dict[WaitFor, WaitStage] = {
    WaitFor.START: "accepted",
    WaitFor.ROW: "row",
    WaitFor.PERMISSIONS: "applied",
}
_STATUS: dict[str, Literal["started", "pending", "synced", "stale"]] = {
    "queued": "started",
    "row_committed": "pending",
    "applied": "synced",
    "stale": "stale",
}


class SyncOutcome(BaseModel):
    """What the caller learns (opaque ids only)."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    workflow_id: str
    event_id: str
    version: int
    status: Literal["started", "pending", "synced", "stale"]
    zed_token: str | None = None


class UserSyncFailed(Exception):
    """The event failed for good and was compensated: the user is as before the event."""

    def __init__(self, workflow_id: str, event_id: str, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.workflow_id = workflow_id
        self.event_id = event_id
        self.error_type = error_type
        self.message = message


async def submit_event(
    event: UserEvent,
    *,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
) -> SyncOutcome:
    """Deliver ``event`` to its user's workflow, starting the workflow if needed.

    Args:
        event: The lifecycle event.
        wait: How long to wait; see the module docstring.
        client: An injected Temporal client (built with ``pydantic_data_converter``); connected
            from the settings when omitted.
        task_queue: The workers' task queue; the settings' by default.

    Returns:
        The outcome at the point the caller asked to wait for.

    Raises:
        InvalidUserInput: The event is malformed; nothing was started or written.
        EventIdConflict: The event id was already used for an event with different content;
            this delivery was not applied and the first event's outcome stands.
        UserSyncFailed: The event failed for good (e.g. ``DuplicateEmail``) and was compensated.
    """
    validate_event(event)
    client, task_queue = await client_and_queue(client, task_queue)
    workflow_id = user_workflow_id(event.user_id)
    try:
        outcome: EventOutcome = await client.execute_update_with_start_workflow(
            UserSyncWorkflow.submit,
            SubmitEventInput(event=event, wait=_STAGE[wait]),
            start_workflow_operation=WithStartWorkflowOperation(
                UserSyncWorkflow.run,
                UserSyncInput(user_id=event.user_id),
                id=workflow_id,
                task_queue=task_queue,
                # The user's workflow runs for as long as the user has events: join it.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            ),
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        raise UserSyncFailed(workflow_id, event.event_id, type(cause).__name__, str(cause)) from err
    if outcome.status == "failed" and outcome.error_type == EventIdConflict.__name__:
        raise EventIdConflict(outcome.message or "", user_id=event.user_id, event_id=event.event_id)
    if outcome.status == "failed":
        raise UserSyncFailed(
            workflow_id, event.event_id, outcome.error_type or "Failed", outcome.message or ""
        )
    return SyncOutcome(
        user_id=event.user_id,
        workflow_id=workflow_id,
        event_id=event.event_id,
        version=event.version,
        status=_STATUS[outcome.status],
        zed_token=outcome.zed_token,
    )


def _event_id(user_id: str, kind: str, version: int) -> str:
    # Derived from the business key, so the app re-sending the same change is a duplicate.
    return f"{user_id}:{kind}:v{version}"


async def create_user(
    user: CreateUserInput,
    *,
    version: int = 1,
    event_id: str | None = None,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
) -> SyncOutcome:
    """Deliver a ``created`` event (see :func:`submit_event`)."""
    event = creation_event(user, version=version, event_id=event_id)
    return await submit_event(event, wait=wait, client=client, task_queue=task_queue)


def creation_event(
    user: CreateUserInput, *, version: int = 1, event_id: str | None = None
) -> UserEvent:
    """The ``created`` event :func:`create_user` delivers for ``user``.

    Args:
        user: The user to create.
        version: The user's version after the creation.
        event_id: The event's id; derived from the user id and version by default.

    Returns:
        The event.
    """
    return UserEvent(
        event_id=event_id or _event_id(user.user_id, "created", version),
        user_id=user.user_id,
        version=version,
        kind="created",
        org_id=user.org_id,
        role=user.role,
        email=user.email,
        name=user.name,
    )


async def _membership_change(
    kind: str,
    user_id: str,
    *,
    org_id: str,
    role: str,
    version: int,
    event_id: str | None,
    wait: WaitFor,
    client: Client | None,
    task_queue: str | None,
) -> SyncOutcome:
    event = UserEvent(
        event_id=event_id or _event_id(user_id, kind, version),
        user_id=user_id,
        version=version,
        kind=kind,
        org_id=org_id,
        role=role,
    )
    return await submit_event(event, wait=wait, client=client, task_queue=task_queue)


async def change_role(
    user_id: str,
    *,
    org_id: str,
    role: str,
    version: int,
    event_id: str | None = None,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
) -> SyncOutcome:
    """Deliver a ``role_changed`` event: ``role`` in ``org_id`` from ``version`` on."""
    return await _membership_change(
        "role_changed",
        user_id,
        org_id=org_id,
        role=role,
        version=version,
        event_id=event_id,
        wait=wait,
        client=client,
        task_queue=task_queue,
    )


async def move_user(
    user_id: str,
    *,
    org_id: str,
    role: str,
    version: int,
    event_id: str | None = None,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
) -> SyncOutcome:
    """Deliver a ``moved`` event: the user belongs to ``org_id`` (as ``role``) from ``version``."""
    return await _membership_change(
        "moved",
        user_id,
        org_id=org_id,
        role=role,
        version=version,
        event_id=event_id,
        wait=wait,
        client=client,
        task_queue=task_queue,
    )


async def delete_user(
    user_id: str,
    *,
    version: int,
    event_id: str | None = None,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
) -> SyncOutcome:
    """Deliver a ``deleted`` event: permissions are revoked first, then the row is deleted."""
    event = UserEvent(
        event_id=event_id or _event_id(user_id, "deleted", version),
        user_id=user_id,
        version=version,
        kind="deleted",
    )
    return await submit_event(event, wait=wait, client=client, task_queue=task_queue)
