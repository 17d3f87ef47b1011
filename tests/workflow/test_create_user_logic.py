"""Saga logic on the time-skipping test server, with the activities replaced by recorders."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from spicesync.errors import DuplicateEmail, SpiceDBRejected, SpiceDBUnavailable, UserRowMissing
from spicesync.models import (
    CreateUserInput,
    DeleteMembershipInput,
    DeleteMembershipResult,
    DeleteUserRowInput,
    DeleteUserRowResult,
    InsertUserRowInput,
    InsertUserRowResult,
    MarkUserSyncedInput,
    MarkUserSyncedResult,
    WriteMembershipInput,
    WriteMembershipResult,
)
from workflows.create_user import CreateUserWorkflow

Behaviour = Callable[[int], Awaitable[None]]


class FakeSteps:
    """Stand-ins for the five activities: record each attempt, fail when told to."""

    def __init__(self, **behaviour: Behaviour) -> None:
        self.calls: list[str] = []
        self.attempts: dict[str, int] = {}
        self._behaviour = behaviour

    async def _step(self, name: str) -> None:
        self.calls.append(name)
        self.attempts[name] = self.attempts.get(name, 0) + 1
        if name in self._behaviour:
            await self._behaviour[name](self.attempts[name])

    @activity.defn(name="insert_user_row")
    async def insert_user_row(self, _: InsertUserRowInput) -> InsertUserRowResult:
        await self._step("insert_user_row")
        return InsertUserRowResult(created=True)

    @activity.defn(name="write_membership")
    async def write_membership(self, _: WriteMembershipInput) -> WriteMembershipResult:
        await self._step("write_membership")
        return WriteMembershipResult(zed_token="token-1")

    @activity.defn(name="mark_user_synced")
    async def mark_user_synced(self, _: MarkUserSyncedInput) -> MarkUserSyncedResult:
        await self._step("mark_user_synced")
        return MarkUserSyncedResult(status="synced")

    @activity.defn(name="delete_membership")
    async def delete_membership(self, _: DeleteMembershipInput) -> DeleteMembershipResult:
        await self._step("delete_membership")
        return DeleteMembershipResult(zed_token="token-2")

    @activity.defn(name="delete_user_row")
    async def delete_user_row(self, _: DeleteUserRowInput) -> DeleteUserRowResult:
        await self._step("delete_user_row")
        return DeleteUserRowResult(deleted=True)

    def activities(self) -> list[Any]:
        return [
            self.insert_user_row,
            self.write_membership,
            self.mark_user_synced,
            self.delete_membership,
            self.delete_user_row,
        ]


def new_event(**changes: str) -> CreateUserInput:
    fields = {
        "user_id": str(uuid.uuid4()),
        "email": "ada@example.com",
        "name": "Ada",
        "org_id": "acme",
        "role": "member",
    } | changes
    return CreateUserInput(**fields)


def fail_first(times: int, error: Exception) -> Behaviour:
    async def behaviour(attempt: int) -> None:
        if attempt <= times:
            raise error

    return behaviour


def always(error: Exception) -> Behaviour:
    async def behaviour(_attempt: int) -> None:
        raise error

    return behaviour


async def run_saga(
    env: WorkflowEnvironment, task_queue: str, steps: FakeSteps, event: CreateUserInput
) -> Any:
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[CreateUserWorkflow],
        activities=steps.activities(),
    ):
        return await env.client.execute_workflow(
            CreateUserWorkflow.run, event, id=f"wf-{uuid.uuid4()}", task_queue=task_queue
        )


async def test_transient_failures_retry_until_success(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(
        insert_user_row=fail_first(3, ConnectionResetError("PostgreSQL went away")),
        write_membership=fail_first(5, SpiceDBUnavailable("UNAVAILABLE")),
    )
    result = await run_saga(time_skipping_env, task_queue, steps, new_event())
    assert result.status == "synced" and result.zed_token == "token-1"
    assert steps.attempts == {"insert_user_row": 4, "write_membership": 6, "mark_user_synced": 1}


async def test_permanent_failure_compensates_in_reverse_order(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(mark_user_synced=always(UserRowMissing("gone")))
    with pytest.raises(WorkflowFailureError) as caught:
        await run_saga(time_skipping_env, task_queue, steps, new_event())
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "UserRowMissing"
    assert steps.calls == [
        "insert_user_row",
        "write_membership",
        "mark_user_synced",  # one attempt: permanent errors are not retried
        "delete_membership",
        "delete_user_row",
    ]


async def test_rejected_relationship_write_fails_fast_and_removes_the_row(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(write_membership=always(SpiceDBRejected("INVALID_ARGUMENT")))
    with pytest.raises(WorkflowFailureError) as caught:
        await run_saga(time_skipping_env, task_queue, steps, new_event())
    assert isinstance(caught.value.cause, ApplicationError)
    assert caught.value.cause.type == "SpiceDBRejected"
    assert steps.attempts["write_membership"] == 1
    # A refused write landed nothing, so only the row is undone.
    assert steps.calls == ["insert_user_row", "write_membership", "delete_user_row"]


async def test_duplicate_email_writes_nothing_to_spicedb(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(insert_user_row=always(DuplicateEmail("taken")))
    with pytest.raises(WorkflowFailureError) as caught:
        await run_saga(time_skipping_env, task_queue, steps, new_event())
    assert isinstance(caught.value.cause, ApplicationError)
    assert caught.value.cause.type == "DuplicateEmail"
    assert "write_membership" not in steps.calls and "delete_membership" not in steps.calls


async def test_compensation_failures_retry_until_they_succeed(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(
        mark_user_synced=always(UserRowMissing("gone")),
        # Even a "permanent" error type is retried during compensation: it must finish.
        delete_membership=fail_first(2, SpiceDBRejected("flaky")),
        delete_user_row=fail_first(4, ConnectionRefusedError("PostgreSQL down")),
    )
    with pytest.raises(WorkflowFailureError):
        await run_saga(time_skipping_env, task_queue, steps, new_event())
    assert steps.attempts["delete_membership"] == 3
    assert steps.attempts["delete_user_row"] == 5


async def test_invalid_input_writes_nothing(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps()
    with pytest.raises(WorkflowFailureError) as caught:
        await run_saga(time_skipping_env, task_queue, steps, new_event(email="nope", org_id="a b"))
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidUserInput"
    assert "email:" in cause.message and "org_id:" in cause.message
    assert steps.calls == []


async def test_cancellation_compensates_after_the_inflight_write_stops(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    write_running = asyncio.Event()

    async def hang_until_cancelled(_attempt: int) -> None:
        write_running.set()
        while True:  # heartbeating is how an activity learns it was cancelled
            activity.heartbeat()
            await asyncio.sleep(0.1)

    steps = FakeSteps(write_membership=hang_until_cancelled)
    env = time_skipping_env
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[CreateUserWorkflow],
        activities=steps.activities(),
        # Deliver the cancel to the activity's next heartbeat at once, not after the 30 s
        # default throttle.
        default_heartbeat_throttle_interval=timedelta(milliseconds=50),
        max_heartbeat_throttle_interval=timedelta(milliseconds=50),
    ):
        handle = await env.client.start_workflow(
            CreateUserWorkflow.run, new_event(), id=f"wf-{uuid.uuid4()}", task_queue=task_queue
        )
        await asyncio.wait_for(write_running.wait(), 30)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        assert isinstance(caught.value.cause, CancelledError)
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert steps.calls == [
        "insert_user_row",
        "write_membership",
        "delete_membership",
        "delete_user_row",
    ]
