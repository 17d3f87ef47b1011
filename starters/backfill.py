"""Start (or rejoin) the backfill of users spicesync has never written to SpiceDB."""

from __future__ import annotations

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy

from spicesync.constants import BACKFILL_WORKFLOW_ID
from spicesync.models import BackfillInput, BackfillResult
from spicesync.temporal import client_and_queue
from workflows.backfill import BackfillWorkflow

__all__ = ["start_backfill"]


async def start_backfill(
    request: BackfillInput,
    *,
    client: Client | None = None,
    task_queue: str | None = None,
    workflow_id: str = BACKFILL_WORKFLOW_ID,
) -> WorkflowHandle[BackfillWorkflow, BackfillResult]:
    """Start the backfill, or join it if it is already running (resumable by design).

    Args:
        request: Batch size and rate limit (ignored when joining a running backfill).
        client: An injected Temporal client; connected from the settings when omitted.
        task_queue: The workers' task queue; the settings' by default.
        workflow_id: The backfill's id (one at a time per id).

    Returns:
        The handle; its ``progress`` query drives a progress bar, ``result()`` gives the figures.
    """
    client, task_queue = await client_and_queue(client, task_queue)
    return await client.start_workflow(
        BackfillWorkflow.run,
        request,
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    )
