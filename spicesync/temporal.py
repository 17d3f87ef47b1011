"""The Temporal client, connected the same way by workers, starters and the CLI."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeVar

from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
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
from spicesync.constants import ACTIVE_STAGES, SEARCH_ATTRIBUTES, user_workflow_id
from spicesync.settings import Settings, load_settings

__all__ = [
    "NamespaceNotSetUp",
    "NamespaceSetup",
    "TemporalUnreachable",
    "client_and_queue",
    "connect_temporal",
    "execute_update_with_start",
    "register_search_attributes",
    "sync_is_active",
    "workers_polling",
]

SelfT = TypeVar("SelfT")
ArgT = TypeVar("ArgT")
ResultT = TypeVar("ResultT")


class TemporalUnreachable(RuntimeError):
    """No Temporal server answered at the configured address."""


class NamespaceNotSetUp(RuntimeError):
    """The namespace's search attributes cannot be made what spicesync needs."""


@dataclass
class NamespaceSetup:
    """What :func:`register_search_attributes` found and did, per attribute name."""

    namespace: str
    added: list[str] = field(default_factory=list)
    """Registered by this call (or, dry run, would be)."""
    present: list[str] = field(default_factory=list)
    """Already registered with the right type."""
    dry_run: bool = False


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
    """Whether the user's workflow is running and working on a store (an active stage, or none).

    Args:
        client: A Temporal client.
        user_id: The user.

    Returns:
        False when the workflow does not exist, has closed, or shows a resting or failed stage.
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
    # No stage at all: the run has not finished its first event (a healthy one shows none while
    # its steps run inside a workflow task; a failing task shows none either).
    return stage is None or stage in ACTIVE_STAGES


def _indexed_type(kind: str) -> IndexedValueType.ValueType:
    return IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{kind.upper()}")


async def _custom_search_attributes(client: Client) -> dict[str, IndexedValueType.ValueType]:
    response = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    return dict(response.custom_attributes)


def _check_types(existing: dict[str, IndexedValueType.ValueType], namespace: str) -> None:
    wrong = [
        f"{name} is registered as"
        f" {IndexedValueType.Name(existing[name]).removeprefix('INDEXED_VALUE_TYPE_').title()}"
        f" but spicesync sets a {kind}"
        for name, kind in SEARCH_ATTRIBUTES.items()
        if name in existing and existing[name] != _indexed_type(kind)
    ]
    if wrong:
        raise NamespaceNotSetUp(
            "; ".join(wrong) + f" (namespace {namespace}): a search attribute's type cannot"
            " change; remove it (`temporal operator search-attribute remove`) first"
        )


async def register_search_attributes(client: Client, *, dry_run: bool = False) -> NamespaceSetup:
    """Register every search attribute spicesync sets (:data:`SEARCH_ATTRIBUTES`), idempotently.

    Through Temporal's operator API on the client's namespace: attributes already registered
    with the right type are left alone, so running it again (or from two places at once)
    changes nothing.

    Args:
        client: A client of the namespace the workers use.
        dry_run: Only report what is missing.

    Returns:
        Which attributes were added and which were there.

    Raises:
        NamespaceNotSetUp: One is registered with another type, or the server refuses the
            operator API (Temporal Cloud: register them with ``tcld`` or the Cloud UI).
    """
    try:
        existing = await _custom_search_attributes(client)
        _check_types(existing, client.namespace)
        setup = NamespaceSetup(client.namespace, dry_run=dry_run)
        setup.present = [name for name in SEARCH_ATTRIBUTES if name in existing]
        setup.added = [name for name in SEARCH_ATTRIBUTES if name not in existing]
        if setup.added and not dry_run:
            try:
                await client.operator_service.add_search_attributes(
                    AddSearchAttributesRequest(
                        namespace=client.namespace,
                        search_attributes={
                            name: _indexed_type(SEARCH_ATTRIBUTES[name]) for name in setup.added
                        },
                    )
                )
            except RPCError as err:
                if err.status != RPCStatusCode.ALREADY_EXISTS:
                    raise
                # Another run registered some first: fine if all are there now, as needed.
                existing = await _custom_search_attributes(client)
                _check_types(existing, client.namespace)
                setup.added = [name for name in setup.added if name in existing]
                if set(SEARCH_ATTRIBUTES) - set(existing):
                    raise
    except RPCError as err:
        if err.status in (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNIMPLEMENTED):
            raise NamespaceNotSetUp(
                f"Temporal refused the operator API ({err.status.name}: {err.message}):"
                " register the search attributes another way (Temporal Cloud: `tcld namespace"
                " search-attributes add` or the Cloud UI): "
                + ", ".join(f"{name}={kind}" for name, kind in SEARCH_ATTRIBUTES.items())
            ) from err
        raise
    return setup
