"""Events delivered again, on the real engines: reused ids, deleted users, rolled-back events.

A user's workflow remembers what became of each event id while it runs (and across
continue-as-new); once it has closed idle, a new run knows only what the App DB records.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from spicesync.constants import user_workflow_id
from spicesync.errors import EventIdConflict
from spicesync.models import CreateUserInput, UserSyncInput
from spicesync.settings import Settings
from starters.user_events import (
    UserSyncFailed,
    WaitFor,
    change_role,
    create_user,
    delete_user,
    move_user,
)
from tests.conftest import SpiceDBServer
from tests.integration.conftest import (
    Pipeline,
    assert_neither,
    assert_synced,
    eventually,
    new_event,
    relationships_of,
    user_row,
)
from workflows.user_sync import UserSyncWorkflow

pytestmark = pytest.mark.integration

# Generous: a decision taken at once arrives in well under a second; the old behaviour was a
# five-minute wait (HELD_CHANGE_GRACE).
PROMPT = 60.0


def queue(p: Pipeline) -> dict[str, Any]:
    return {"client": p.client, "task_queue": p.task_queue}


async def start_short_lived(p: Pipeline, user_id: str, idle_seconds: float) -> str:
    """Start the user's workflow as update-with-start would, but closing when idle this soon.

    Returns:
        The run id; the starters' deliveries join this run while it is open.
    """
    handle = await p.client.start_workflow(
        UserSyncWorkflow.run,
        UserSyncInput(user_id=user_id, idle_seconds=idle_seconds),
        id=user_workflow_id(user_id),
        task_queue=p.task_queue,
    )
    assert handle.result_run_id is not None
    return handle.result_run_id


async def current_run(p: Pipeline, user_id: str) -> tuple[str, WorkflowExecutionStatus | None]:
    described = await p.client.get_workflow_handle(user_workflow_id(user_id)).describe()
    return described.run_id, described.status


async def wait_closed_idle(p: Pipeline, user_id: str) -> None:
    async def closed() -> bool:
        return (await current_run(p, user_id))[1] == WorkflowExecutionStatus.COMPLETED

    await eventually(closed, timeout=60)


# --- Issue 15 #1: an event id reused with other content is a conflict ------------------------


async def test_a_reused_event_id_is_a_conflict_after_the_first_was_applied(
    pipeline: Pipeline,
) -> None:
    user = new_event()
    await create_user(user, **queue(pipeline))
    promoted = await change_role(
        user.user_id,
        org_id=user.org_id,
        role="admin",
        version=3,
        event_id="evt-dup-42",
        **queue(pipeline),
    )
    # The same id for another change (the report: answered "synced", change dropped).
    with pytest.raises(EventIdConflict) as caught:
        await change_role(
            user.user_id,
            org_id=user.org_id,
            role="member",
            version=4,
            event_id="evt-dup-42",
            **queue(pipeline),
        )
    assert (caught.value.user_id, caught.value.event_id) == (user.user_id, "evt-dup-42")
    assert "evt-dup-42" in caught.value.message
    # The first event stands, in both stores; a true duplicate still gets its outcome.
    again = await change_role(
        user.user_id,
        org_id=user.org_id,
        role="admin",
        version=3,
        event_id="evt-dup-42",
        **queue(pipeline),
    )
    assert (again.status, again.zed_token) == ("synced", promoted.zed_token)
    row = await user_row(pipeline.pool, user.user_id)
    assert row is not None and (row["version"], row["role"]) == (3, "admin")
    await assert_synced(pipeline, user.model_copy(update={"role": "admin"}), promoted.zed_token)


async def test_a_reused_event_id_is_a_conflict_while_the_first_is_pending(
    pipeline: Pipeline,
) -> None:
    user = new_event()
    # A change that arrives before its creation is held, pending, until the creation comes.
    held = await change_role(
        user.user_id,
        org_id=user.org_id,
        role="admin",
        version=2,
        event_id="held-change",
        wait=WaitFor.START,
        **queue(pipeline),
    )
    assert held.status == "started"
    # START only hands the reuse to Temporal (the workflow finds it later, and drops it);
    # ACCEPTED waits for the workflow's verdict.
    for wait in (WaitFor.START, WaitFor.ACCEPTED):
        reuse = move_user(
            user.user_id,
            org_id=f"{user.org_id}-b",
            role="member",
            version=2,
            event_id="held-change",
            wait=wait,
            **queue(pipeline),
        )
        if wait is WaitFor.START:
            assert (await reuse).status == "started"
        else:
            with pytest.raises(EventIdConflict):
                await reuse
    await create_user(user, **queue(pipeline))
    applied = await change_role(
        user.user_id,
        org_id=user.org_id,
        role="admin",
        version=2,
        event_id="held-change",
        **queue(pipeline),
    )
    assert applied.status == "synced"
    row = await user_row(pipeline.pool, user.user_id)
    assert row is not None and (row["org_id"], row["role"]) == (user.org_id, "admin")
    await assert_synced(pipeline, user.model_copy(update={"role": "admin"}), applied.zed_token)


async def test_a_reused_event_id_is_a_conflict_after_the_workflow_closed(
    pipeline: Pipeline,
) -> None:
    """A new run compares the redelivered event with what the App DB row records for its id."""
    user = new_event()
    await start_short_lived(pipeline, user.user_id, idle_seconds=5)
    await create_user(user, **queue(pipeline))
    promoted = await change_role(
        user.user_id, org_id=user.org_id, role="admin", version=2, event_id="x", **queue(pipeline)
    )
    await wait_closed_idle(pipeline, user.user_id)
    # Before, a newer version under the applied id was queued and applied as a new event.
    with pytest.raises(EventIdConflict):
        await change_role(
            user.user_id,
            org_id=user.org_id,
            role="member",
            version=3,
            event_id="x",
            **queue(pipeline),
        )
    with pytest.raises(EventIdConflict):
        await move_user(
            user.user_id,
            org_id="elsewhere",
            role="admin",
            version=2,
            event_id="x",
            **queue(pipeline),
        )
    # The same event again is a duplicate: its outcome, with its token.
    again = await change_role(
        user.user_id, org_id=user.org_id, role="admin", version=2, event_id="x", **queue(pipeline)
    )
    assert (again.status, again.zed_token) == ("synced", promoted.zed_token)
    await assert_synced(pipeline, user.model_copy(update={"role": "admin"}), promoted.zed_token)


async def test_the_cli_exits_non_zero_with_one_json_line_on_a_conflict(
    pipeline: Pipeline,
    temporal_env: WorkflowEnvironment,
    test_codec_keys: str,
    database_url: str,
    spicedb_server: SpiceDBServer,
) -> None:
    user = new_event()
    await create_user(user, **queue(pipeline))
    await change_role(
        user.user_id,
        org_id=user.org_id,
        role="admin",
        version=3,
        event_id="evt-dup-42",
        **queue(pipeline),
    )
    env = Settings(
        temporal_address=temporal_env.client.service_client.config.target_host,
        temporal_namespace=temporal_env.client.namespace,
        encryption_keys=SecretStr(test_codec_keys),
        _env_file=None,  # type: ignore[call-arg]
    ).worker_environment(
        task_queue=pipeline.task_queue,
        database_url=database_url,
        spicedb_endpoint=spicedb_server.endpoint,
        spicedb_key=spicedb_server.preshared_key,
    )
    args = ["update", "--user-id", user.user_id, "--org", user.org_id, "--role", "member"]
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "spicesync", "users", *args],
        *["--version", "4", "--event-id", "evt-dup-42"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 1, stdout.decode() + stderr.decode()
    lines = stdout.decode().splitlines()
    assert len(lines) == 1
    printed = json.loads(lines[0])
    assert (printed["error"], printed["event_id"]) == ("EventIdConflict", "evt-dup-42")
    row = await user_row(pipeline.pool, user.user_id)
    assert row is not None and (row["version"], row["role"]) == (3, "admin")


# --- Issue 15 #2: a change to a deleted user is answered at once -----------------------------


async def test_a_change_to_a_deleted_user_fails_at_once(pipeline: Pipeline) -> None:
    user = new_event()
    await create_user(user, **queue(pipeline))
    await delete_user(user.user_id, version=2, **queue(pipeline))
    with pytest.raises(UserSyncFailed) as caught:
        await asyncio.wait_for(
            change_role(
                user.user_id, org_id=user.org_id, role="admin", version=3, **queue(pipeline)
            ),
            PROMPT,
        )
    assert caught.value.error_type == "UserNotFound"
    await assert_neither(pipeline, user)


async def test_a_change_to_a_user_deleted_before_the_workflow_closed_fails_at_once(
    pipeline: Pipeline,
) -> None:
    """The issue's case: a new run learns from the App DB's tombstone that the user is gone."""
    user = new_event()
    await start_short_lived(pipeline, user.user_id, idle_seconds=5)
    await create_user(user, **queue(pipeline))
    await delete_user(user.user_id, version=2, **queue(pipeline))
    await wait_closed_idle(pipeline, user.user_id)
    with pytest.raises(UserSyncFailed) as caught:
        await asyncio.wait_for(
            move_user(
                user.user_id, org_id=f"{user.org_id}-b", role="member", version=3, **queue(pipeline)
            ),
            PROMPT,
        )
    assert caught.value.error_type == "UserNotFound"
    await assert_neither(pipeline, user)


# --- Issue 15 #8: a rolled-back event delivered again ----------------------------------------


async def test_a_failed_event_redelivered_gets_its_outcome_until_the_workflow_closes(
    pipeline: Pipeline,
) -> None:
    """A failed event left nothing behind. While the user's workflow remembers it, a duplicate
    gets the same failure; once the workflow closed idle, a redelivery is tried afresh (how an
    app retries after fixing the cause)."""
    owner = new_event()
    await create_user(owner, **queue(pipeline))
    second = new_event(email=owner.email)
    run_id = await start_short_lived(pipeline, second.user_id, idle_seconds=10)
    with pytest.raises(UserSyncFailed) as first:
        await create_user(second, **queue(pipeline))
    assert first.value.error_type == "DuplicateEmail"
    # The cause goes away (the other user is deleted) while the workflow still remembers.
    await delete_user(owner.user_id, version=2, **queue(pipeline))
    with pytest.raises(UserSyncFailed) as again:
        await create_user(second, **queue(pipeline))
    assert again.value.error_type == "DuplicateEmail"
    assert (await current_run(pipeline, second.user_id))[0] == run_id  # the same run answered
    await assert_neither(pipeline, second)
    # Closed idle, the workflow no longer remembers: the redelivery is applied.
    await wait_closed_idle(pipeline, second.user_id)
    applied = await create_user(second, **queue(pipeline))
    assert applied.status == "synced"
    await assert_synced(pipeline, second, applied.zed_token or "")
    assert await relationships_of(pipeline.spicedb, owner.user_id) == []


# --- Issue 16: runs with no idle time close with their last event --------------------------


async def closes_as_a_new_run(p: Pipeline, user_id: str, before: str | None) -> str:
    """Wait for the user's current run to be closed; it must not be the run ``before``."""
    await wait_closed_idle(p, user_id)
    run_id, _ = await current_run(p, user_id)
    assert run_id != before
    return run_id


async def test_with_no_idle_time_each_event_runs_in_a_run_that_closes_with_it(
    pipeline: Pipeline,
) -> None:
    """Each event starts a run that reads the App DB, applies it and closes; a duplicate
    delivered after the close is answered from the App DB, not applied again."""
    user = new_event()
    at_once: dict[str, Any] = {"idle": timedelta(0), **queue(pipeline)}
    created = await create_user(user, **at_once)
    first = await closes_as_a_new_run(pipeline, user.user_id, None)
    await assert_synced(pipeline, user, created.zed_token)
    promotion: dict[str, Any] = {"org_id": user.org_id, "role": "admin", "version": 2, **at_once}
    promoted = await change_role(user.user_id, **promotion)
    second = await closes_as_a_new_run(pipeline, user.user_id, first)
    admin = user.model_copy(update={"role": "admin"})
    await assert_synced(pipeline, admin, promoted.zed_token)
    again = await change_role(user.user_id, **promotion)  # the same event, delivered again
    assert (again.status, again.zed_token) == ("synced", promoted.zed_token)
    await closes_as_a_new_run(pipeline, user.user_id, second)
    await assert_synced(pipeline, admin, promoted.zed_token)
    # Signalled: the caller is answered by the server; the run applies the event and closes.
    deleted = await delete_user(user.user_id, version=3, wait=WaitFor.START, **at_once)
    assert deleted.status == "started"

    async def gone() -> bool:
        return await user_row(pipeline.pool, user.user_id) is None

    await eventually(gone, timeout=60)
    await wait_closed_idle(pipeline, user.user_id)
    await assert_neither(pipeline, user)


async def test_with_no_idle_time_bursts_of_events_all_apply_in_order(pipeline: Pipeline) -> None:
    """Events that arrive while a run applies another, or while it closes, are all applied in
    version order: a refused close is retried with them, its idempotent steps run again."""
    users = [new_event() for _ in range(5)]
    at_once: dict[str, Any] = {"idle": timedelta(0), "wait": WaitFor.START, **queue(pipeline)}

    async def burst(user: CreateUserInput) -> None:
        await create_user(user, **at_once)
        await asyncio.gather(
            change_role(user.user_id, org_id=user.org_id, role="admin", version=2, **at_once),
            move_user(user.user_id, org_id=f"{user.org_id}-b", role="admin", version=3, **at_once),
            change_role(
                user.user_id, org_id=f"{user.org_id}-b", role="member", version=4, **at_once
            ),
        )

    await asyncio.gather(*(burst(user) for user in users))
    for user in users:
        last = user.model_copy(update={"org_id": f"{user.org_id}-b", "role": "member"})
        # The last event again, waiting for its permissions: answered once it is applied.
        applied = await change_role(
            user.user_id,
            org_id=last.org_id,
            role="member",
            version=4,
            idle=timedelta(0),
            **queue(pipeline),
        )
        assert applied.status == "synced"
        row = await user_row(pipeline.pool, user.user_id)
        assert row is not None and row["version"] == 4
        await assert_synced(pipeline, last, applied.zed_token or "")
        await wait_closed_idle(pipeline, user.user_id)
