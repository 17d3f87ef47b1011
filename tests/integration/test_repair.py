"""Each repair action on a real stuck sync ends in a correct state (synced, or neither)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import WorkflowExecutionStatus

from starters import repair
from starters.user_events import change_role, create_user, move_user
from tests.conftest import SpiceDBServer
from tests.integration.conftest import (
    Pipeline,
    assert_neither,
    assert_synced,
    new_event,
    start_held,
)

pytestmark = pytest.mark.integration


async def test_retry_now_completes_without_waiting_for_the_backoff(
    pipeline: Pipeline, spicedb_server: SpiceDBServer
) -> None:
    user = new_event()
    spicedb_server.pause()
    try:
        await start_held(pipeline.client, pipeline.task_queue, user, attempts=3)
    finally:
        spicedb_server.resume()
    began = time.monotonic()
    assert await repair.retry_now(pipeline.client, user.user_id) == ["write_memberships"]
    done = await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    # The next natural attempt was 4 s away (1 s doubling); reset runs it now.
    assert time.monotonic() - began < 3.5
    await assert_synced(pipeline, user, done.zed_token or "")


async def test_rollback_of_a_stuck_sync_ends_with_neither(
    pipeline: Pipeline, spicedb_server: SpiceDBServer
) -> None:
    user = new_event()
    spicedb_server.pause()
    try:
        await start_held(pipeline.client, pipeline.task_queue, user, attempts=2)
        rolled = asyncio.create_task(repair.rollback(pipeline.client, user.user_id))
        await asyncio.sleep(0.5)
    finally:
        spicedb_server.resume()
    assert await rolled == WorkflowExecutionStatus.CANCELED
    await assert_neither(pipeline, user)


async def test_resume_of_a_sync_that_is_not_parked_says_so(pipeline: Pipeline) -> None:
    user = new_event()
    await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    assert await repair.resume(pipeline.client, user.user_id) is False


async def test_ui_reset_to_the_start_replays_to_the_same_state(pipeline: Pipeline) -> None:
    """The UI's Reset re-runs the workflow from a past point; idempotent, version-guarded
    writes make the user end where the events say."""
    user = new_event()
    await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    promoted = await change_role(
        user.user_id,
        org_id=user.org_id,
        role="admin",
        version=2,
        client=pipeline.client,
        task_queue=pipeline.task_queue,
    )
    handle = pipeline.client.get_workflow_handle(promoted.workflow_id)
    history = await handle.fetch_history()
    first_task = next(
        e.event_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )
    reset = await pipeline.client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=pipeline.client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=promoted.workflow_id),
            reason="test: operator reset from the UI",
            workflow_task_finish_event_id=first_task,
            request_id=str(uuid.uuid4()),
        )
    )
    assert reset.run_id
    # A later event reaches the new run and is applied on top of the replayed state.
    moved = await move_user(
        user.user_id,
        org_id=f"{user.org_id}-b",
        role="admin",
        version=3,
        client=pipeline.client,
        task_queue=pipeline.task_queue,
    )
    assert moved.status == "synced"
    after = user.model_copy(update={"org_id": f"{user.org_id}-b", "role": "admin"})
    await assert_synced(pipeline, after, moved.zed_token or "")
