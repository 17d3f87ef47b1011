"""The Temporal client, connected the same way by workers, starters and the CLI."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, TypeVar

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode
from temporalio.workflow import UpdateMethodMultiParam

from spicesync.codec import encrypted_data_converter
from spicesync.constants import ACTIVE_STAGES, user_workflow_id
from spicesync.settings import Settings, load_settings

__all__ = [
    "TemporalUnreachable",
    "client_and_queue",
    "connect_temporal",
    "execute_update_with_start",
    "sync_is_active",
    "workers_polling",
]

SelfT = TypeVar("SelfT")
ArgT = TypeVar("ArgT")
ResultT = TypeVar("ResultT")


class TemporalUnreachable(RuntimeError):
    """No Temporal server answered at the configured address."""


async def connect_temporal(
    settings: Settings, *, runtime: Runtime | None = None, lazy: bool = False
) -> Client:
    """Connect to Temporal the SDK's env-config way, with the pydantic converter and encryption.

    Args:
        settings: spicesync's settings.
        runtime: A Temporal runtime (e.g. one exporting metrics); the default one otherwise.
        lazy: Connect at the first call instead of now (a process that waits out a Temporal
            outage, such as the outbox relay, may start while Temporal is down).

    Returns:
        A connected client.

    Raises:
        TemporalUnreachable: Nothing answered at the address (the SDK's connection error,
            named with the address and what to do).
    """
    config = settings.temporal_connect_config()
    try:
        return await Client.connect(
            **config,
            data_converter=encrypted_data_converter(settings.codec()),
            # Trace context crosses from the starter into the workflow and its activities (the
            # worker shares its client's interceptors).
            interceptors=[TracingInterceptor()],
            runtime=runtime,
            lazy=lazy,
        )
    except RuntimeError as err:
        # The SDK reports a failed connection as a bare RuntimeError("Failed client connect...").
        if "connect" not in str(err).lower():
            raise
        address = config.get("target_host", settings.temporal_address)
        raise TemporalUnreachable(
            f"cannot reach Temporal at {address}: start the local stack with `spicesync stack"
            " up`, or set TEMPORAL_ADDRESS"
        ) from err


async def workers_polling(client: Client, task_queue: str) -> int:
    """How many workers poll ``task_queue`` for workflow tasks (seen in the last minutes).

    Args:
        client: A connected client.
        task_queue: The queue.

    Returns:
        The number of pollers Temporal knows of.
    """
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    return len(response.pollers)


async def client_and_queue(client: Client | None, task_queue: str | None) -> tuple[Client, str]:
    """What a starter uses: the injected client and queue, or those the settings give.

    Args:
        client: An injected client, or ``None`` to connect from the settings.
        task_queue: The workers' task queue, or ``None`` for the settings'.

    Returns:
        The client and the task queue.
    """
    if client is not None and task_queue is not None:
        return client, task_queue
    settings = load_settings()
    return client or await connect_temporal(settings), task_queue or settings.task_queue


async def execute_update_with_start(
    client: Client,
    update: UpdateMethodMultiParam[[SelfT, ArgT], ResultT],
    arg: ArgT,
    *,
    start_workflow_operation: WithStartWorkflowOperation[SelfT, Any],
) -> ResultT:
    """``Client.execute_update_with_start_workflow``, leaving a cancelled caller cancelled.

    The SDK (1.35) turns the cancellation of the calling task into
    ``WorkflowUpdateRPCTimeoutOrCancelledError`` and parks the ``CancelledError`` in the start
    operation, where nothing reads it: asyncio later prints it, with a traceback, as "Future
    exception was never retrieved". An activity cancelled at worker shutdown would so log two
    tracebacks and end as failed rather than cancelled. Here the parked outcome is collected and
    a cancellation stays an ``asyncio.CancelledError``.

    Args:
        client: A connected client.
        update: The workflow's update method.
        arg: The update's argument.
        start_workflow_operation: Starts the workflow if it is not running.

    Returns:
        The update's result.
    """
    try:
        return await client.execute_update_with_start_workflow(
            update, arg, start_workflow_operation=start_workflow_operation
        )
    except WorkflowUpdateRPCTimeoutOrCancelledError as err:
        task = asyncio.current_task()
        if isinstance(err.__cause__, asyncio.CancelledError) or (task and task.cancelling()):
            raise asyncio.CancelledError(*getattr(err.__cause__, "args", ())) from None
        raise
    finally:
        # The SDK's future of the start's outcome (private; checked defensively): reading a
        # parked exception marks it retrieved, and leaves it there for anyone who asks.
        parked = getattr(start_workflow_operation, "_workflow_handle", None)
        if isinstance(parked, asyncio.Future) and parked.done() and not parked.cancelled():
            parked.exception()


async def sync_is_active(client: Client, user_id: str | uuid.UUID) -> bool:
    """Whether the user's workflow is running and working on a store (an active stage).

    Args:
        client: A Temporal client.
        user_id: The user.

    Returns:
        False when the workflow does not exist, has closed, or is idle.
    """
    handle = client.get_workflow_handle(user_workflow_id(user_id))
    try:
        description = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    if description.status != WorkflowExecutionStatus.RUNNING:
        return False
    stage = {k.name: v for k, v in description.typed_search_attributes}.get("SpicesyncStage")
    return stage in ACTIVE_STAGES
