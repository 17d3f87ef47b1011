"""Repair a user's sync with Temporal's own operations (``spicesync repair ...``).

* ``retry`` — retry now: reset the retrying activity's backoff (Temporal's ResetActivity), for
  when the outage it waited on is over and nobody wants to wait for the next attempt;
* ``rollback`` — cancel the user's workflow: the event in flight is compensated exactly and the
  events queued behind it fail as cancelled; the next event starts afresh;
* ``resume`` — resume a sync parked on a schema mismatch, after the schema was fixed.

No queue is touched, because there is none: each is one call to Temporal. In follow mode
(``followed=True``) the same operations apply to a followed user's workflow; a rollback there
only stops the sync in flight (a sync has nothing to compensate: the next change reads the row
afresh).
"""

from __future__ import annotations

import contextlib

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import ResetActivityRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from spicesync.constants import followed_user_workflow_id, user_workflow_id
from spicesync.models import ResumeInput
from workflows.followed_user import FollowedUserWorkflow
from workflows.user_sync import UserSyncWorkflow

__all__ = ["resume", "retry_now", "rollback"]


def _workflow_id(user_id: str, followed: bool) -> str:
    return followed_user_workflow_id(user_id) if followed else user_workflow_id(user_id)


async def retry_now(client: Client, user_id: str, *, followed: bool = False) -> list[str]:
    """Run the user's retrying activities again now, with their attempt counts reset.

    Returns:
        The names of the activities reset (empty if nothing was retrying).
    """
    workflow_id = _workflow_id(user_id, followed)
    description = await client.get_workflow_handle(workflow_id).describe()
    reset = []
    for pending in description.raw_description.pending_activities:
        await client.workflow_service.reset_activity(
            ResetActivityRequest(
                namespace=client.namespace,
                execution=WorkflowExecution(workflow_id=workflow_id),
                id=pending.activity_id,
                identity="spicesync repair retry",
            )
        )
        reset.append(pending.activity_type.name)
    return reset


async def rollback(
    client: Client, user_id: str, *, followed: bool = False
) -> WorkflowExecutionStatus | None:
    """Cancel the user's workflow and wait until its compensation has finished.

    Returns:
        How the workflow closed (``CANCELED`` after a rollback).
    """
    handle = client.get_workflow_handle(_workflow_id(user_id, followed))
    await handle.cancel()
    with contextlib.suppress(WorkflowFailureError):  # cancelled: that is the point
        await handle.result()
    return (await handle.describe()).status


async def resume(client: Client, user_id: str, *, followed: bool = False) -> bool:
    """Resume a parked sync; ``False`` if it was not parked."""
    if followed:
        followed_handle = client.get_workflow_handle_for(
            FollowedUserWorkflow.run, followed_user_workflow_id(user_id)
        )
        result = await followed_handle.execute_update(FollowedUserWorkflow.resume, ResumeInput())
        return result.resumed
    handle = client.get_workflow_handle_for(UserSyncWorkflow.run, user_workflow_id(user_id))
    return (await handle.execute_update(UserSyncWorkflow.resume, ResumeInput())).resumed
