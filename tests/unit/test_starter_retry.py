"""Which refusals of a start call the starter retries (issue 18): passing ones only."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from spicesync.client import _passing


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (RPCStatusCode.UNAVAILABLE, "tcp connect error"),
        (RPCStatusCode.RESOURCE_EXHAUSTED, "namespace rate limit exceeded"),
        (RPCStatusCode.DEADLINE_EXCEEDED, "context deadline exceeded"),
        (
            RPCStatusCode.FAILED_PRECONDITION,
            "Unable to perform workflow execution update due to Workflow Task in failed state.",
        ),
        (RPCStatusCode.FAILED_PRECONDITION, "Update-with-Start could not be executed."),
        (RPCStatusCode.NOT_FOUND, "workflow execution already completed"),
    ],
)
async def test_passing_refusals_are_retried(status: RPCStatusCode, message: str) -> None:
    assert _passing(RPCError(message, status, b""))


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (RPCStatusCode.INVALID_ARGUMENT, "update name is empty"),
        (RPCStatusCode.FAILED_PRECONDITION, "namespace is not active"),
        (RPCStatusCode.NOT_FOUND, "namespace default not found"),
        (RPCStatusCode.PERMISSION_DENIED, "unauthorized"),
    ],
)
async def test_other_refusals_are_raised(status: RPCStatusCode, message: str) -> None:
    assert not _passing(RPCError(message, status, b""))


async def test_the_callers_own_cancel_is_never_retried() -> None:
    seen: list[bool] = []

    async def cancelled_call() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append(_passing(WorkflowUpdateRPCTimeoutOrCancelledError()))
            raise

    task = asyncio.create_task(cancelled_call())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [False]
    # The same error from an attempt cut short by the deadline (not the caller's cancel) is.
    assert _passing(WorkflowUpdateRPCTimeoutOrCancelledError())
