"""Start the user-creation saga from application code.

Three ways to wait, for three kinds of caller:

* ``WaitFor.START``: return as soon as Temporal has durably accepted the event;
* ``WaitFor.ROW``: return once the App DB row is committed (the seed's "201 Created" moment),
  through update-with-start, so the caller waits on the workflow itself, not a polling loop;
* ``WaitFor.PERMISSIONS``: return once SpiceDB has the relationship, with its ZedToken, so the
  caller's next permission check can ask for ``at_least_as_fresh`` that token.

The workflow id is derived from the user id, so calling again with the same event (a retry, a
duplicate delivery) attaches to the same workflow instead of creating anything twice.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from spicesync.constants import create_user_workflow_id
from spicesync.models import CreateUserInput, CreateUserResult, RowCommittedInput
from spicesync.settings import load_settings
from spicesync.temporal import connect_temporal
from spicesync.validation import validate_create_user
from workflows.create_user import CreateUserWorkflow

__all__ = ["CreateUserOutcome", "UserCreationFailed", "WaitFor", "create_user"]


class WaitFor(enum.StrEnum):
    """How long :func:`create_user` waits."""

    START = "start"
    ROW = "row"
    PERMISSIONS = "permissions"


class CreateUserOutcome(BaseModel):
    """What the caller learns (opaque ids only)."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    workflow_id: str
    status: Literal["started", "pending", "synced"]
    zed_token: str | None = None


class UserCreationFailed(Exception):
    """The saga failed for good and was compensated: the user exists in neither store."""

    def __init__(self, workflow_id: str, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.workflow_id = workflow_id
        self.error_type = error_type
        self.message = message


def _failure(workflow_id: str, err: BaseException) -> UserCreationFailed:
    cause = err.cause if isinstance(err, WorkflowFailureError | WorkflowUpdateFailedError) else err
    if isinstance(cause, ApplicationError):
        return UserCreationFailed(workflow_id, cause.type or "ApplicationError", cause.message)
    return UserCreationFailed(workflow_id, type(cause).__name__, str(cause))


async def create_user(
    event: CreateUserInput,
    *,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
) -> CreateUserOutcome:
    """Start (or attach to) the saga for ``event``.

    Args:
        event: The user to create.
        wait: How long to wait; see the module docstring.
        client: An injected Temporal client (built with ``pydantic_data_converter``); connected
            from the settings when omitted.
        task_queue: The workers' task queue; the settings' by default.

    Returns:
        The outcome at the point the caller asked to wait for.

    Raises:
        InvalidUserInput: The event is malformed; nothing was started or written.
        UserCreationFailed: The saga failed for good (e.g. ``DuplicateEmail``) and compensated.
    """
    validate_create_user(event)
    if client is None or task_queue is None:
        settings = load_settings()
        client = client or await connect_temporal(settings)
        task_queue = task_queue or settings.task_queue
    workflow_id = create_user_workflow_id(event.user_id)
    # USE_EXISTING: a duplicate while the first run is open attaches to it. REJECT_DUPLICATE: a
    # duplicate after it closed starts nothing; the caller gets that run's outcome instead.
    id_conflict_policy = WorkflowIDConflictPolicy.USE_EXISTING
    id_reuse_policy = WorkflowIDReusePolicy.REJECT_DUPLICATE
    try:
        if wait is WaitFor.ROW:
            committed = await client.execute_update_with_start_workflow(
                CreateUserWorkflow.row_committed,
                RowCommittedInput(),
                start_workflow_operation=WithStartWorkflowOperation(
                    CreateUserWorkflow.run,
                    event,
                    id=workflow_id,
                    task_queue=task_queue,
                    id_conflict_policy=id_conflict_policy,
                    id_reuse_policy=id_reuse_policy,
                ),
            )
            return CreateUserOutcome(
                user_id=event.user_id, workflow_id=workflow_id, status=committed.status
            )
        handle = await client.start_workflow(
            CreateUserWorkflow.run,
            event,
            id=workflow_id,
            task_queue=task_queue,
            id_conflict_policy=id_conflict_policy,
            id_reuse_policy=id_reuse_policy,
            request_eager_start=True,
        )
        if wait is WaitFor.START:
            return CreateUserOutcome(
                user_id=event.user_id, workflow_id=workflow_id, status="started"
            )
        result = await handle.result()
    except WorkflowAlreadyStartedError:
        # The event was handled before and its workflow has closed: report how it ended.
        result = await _closed_outcome(client, workflow_id)
    except (WorkflowFailureError, WorkflowUpdateFailedError) as err:
        raise _failure(workflow_id, err) from err
    return CreateUserOutcome(
        user_id=result.user_id,
        workflow_id=workflow_id,
        status=result.status,
        zed_token=result.zed_token,
    )


async def _closed_outcome(client: Client, workflow_id: str) -> CreateUserResult:
    handle = client.get_workflow_handle_for(CreateUserWorkflow.run, workflow_id)
    try:
        return await handle.result()
    except WorkflowFailureError as err:
        raise _failure(workflow_id, err) from err
