"""The Temporal client, connected the same way by workers, starters and the CLI."""

from __future__ import annotations

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.runtime import Runtime

from spicesync.codec import encrypted_data_converter
from spicesync.settings import Settings, load_settings

__all__ = ["client_and_queue", "connect_temporal", "workers_polling"]


async def connect_temporal(settings: Settings, *, runtime: Runtime | None = None) -> Client:
    """Connect to Temporal the SDK's env-config way, with the pydantic converter and encryption.

    Args:
        settings: spicesync's settings.
        runtime: A Temporal runtime (e.g. one exporting metrics); the default one otherwise.

    Returns:
        A connected client.
    """
    config = settings.temporal_connect_config()
    return await Client.connect(
        **config,
        data_converter=encrypted_data_converter(settings.codec()),
        # Trace context crosses from the starter into the workflow and its activities (the
        # worker shares its client's interceptors).
        interceptors=[TracingInterceptor()],
        runtime=runtime,
    )


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
