"""User creation on the real Temporal dev server, PostgreSQL and the SpiceDB engine."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
import pytest
from authzed.api.v1 import ReadSchemaRequest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment

from activities.memberships import MembershipActivities
from activities.user_rows import UserRowActivities
from spicesync.constants import user_workflow_id
from spicesync.errors import InvalidUserInput
from spicesync.models import (
    ApplyRowInput,
    InsertCreatedRowInput,
    Membership,
    WriteMembershipsInput,
)
from spicesync.spicedb import connect_spicedb
from spicesync.stack.components import prepare_spicedb, start_spicedb
from spicesync.stack.processes import free_port, stop_pid, wait_for_port
from starters.user_events import UserSyncFailed, WaitFor, create_user, creation_event
from tests.conftest import SpiceDBServer
from tests.integration.conftest import (
    Engines,
    Pipeline,
    assert_neither,
    assert_synced,
    eventually,
    grant_outside_spicesync,
    local_step_events,
    local_steps,
    new_event,
    relationships_of,
    start_held,
    user_row,
    worker_settings,
)
from workers.worker import SpiceDBKeyRefused, build_worker, open_resources, run_worker
from workflows.user_sync import STAGE

pytestmark = pytest.mark.integration


async def test_happy_path_writes_row_then_permissions(pipeline: Pipeline) -> None:
    member, admin = new_event(), new_event(role="admin")
    for event in (member, admin):
        outcome = await create_user(
            event, wait=WaitFor.PERMISSIONS, client=pipeline.client, task_queue=pipeline.task_queue
        )
        assert outcome.status == "synced" and outcome.zed_token
        assert outcome.workflow_id == user_workflow_id(event.user_id)
        await assert_synced(pipeline, event, outcome.zed_token)
        described = await pipeline.client.get_workflow_handle(outcome.workflow_id).describe()
        assert described.typed_search_attributes.get(STAGE) == "idle"
        # Only opaque ids in the workflow id and search attributes.
        assert event.email not in outcome.workflow_id
        assert event.email not in str(described.typed_search_attributes)


async def test_a_healthy_sync_writes_nothing_before_its_event_is_durably_accepted(
    pipeline: Pipeline,
) -> None:
    """Reads run as local activities in the task that accepts the event; the first write is a
    normal activity, scheduled by the completion that records the acceptance (issue 18)."""
    event = new_event()
    outcome = await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, event, outcome.zed_token or "")
    history = await pipeline.client.get_workflow_handle(outcome.workflow_id).fetch_history()
    # The insert reads the user's App DB state (a new run's first creation: no read step before
    # it); the SpiceDB write checks the state it expects itself (no read step before it either)
    # and records the event on the row in its own transaction (no step after it).
    assert local_steps(history) == ["write_memberships"]
    scheduled = [
        e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert [e.activity_task_scheduled_event_attributes.activity_type.name for e in scheduled] == [
        "insert_created_row"
    ]
    accepted = next(
        e.event_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    )
    # Accepted and first write recorded by one workflow task completion: no task in between.
    between = [e for e in history.events if accepted < e.event_id < scheduled[0].event_id]
    assert not any(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED for e in between)
    # Every local write comes after the insert completed, in a later workflow task.
    completed = next(
        e.event_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
    )
    writes = [i for i, _ in local_step_events(history)]
    assert writes and all(i > completed for i in writes)


async def test_a_creation_whose_row_committed_unrecorded_still_completes(
    pipeline: Pipeline,
) -> None:
    """A worker killed right after the row's commit, before the workflow recorded it: the
    replayed (or re-delivered) creation finds a pending row and must finish it, not call the
    event stale. Found by `spicesync chaos` (worker_killed_after_pg_commit)."""
    event = new_event()
    user = creation_event(event)
    rows = UserRowActivities(pipeline.pool)
    await ActivityEnvironment().run(rows.insert_created_row, InsertCreatedRowInput(event=user))
    outcome = await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    assert outcome.status == "synced"
    await assert_synced(pipeline, event, outcome.zed_token or "")


async def test_a_creation_applied_but_unrecorded_is_answered_synced_with_its_token(
    pipeline: Pipeline,
) -> None:
    """Every step done, the worker killed before the workflow recorded any: the replayed (or
    re-delivered) creation is answered as applied, with the write's ZedToken, not "stale"."""
    event = new_event()
    user = creation_event(event)
    env, rows = ActivityEnvironment(), UserRowActivities(pipeline.pool)
    memberships = MembershipActivities(pipeline.spicedb, pipeline.pool)
    await env.run(rows.insert_created_row, InsertCreatedRowInput(event=user))
    written = await env.run(
        memberships.write_memberships,
        WriteMembershipsInput(
            user_id=event.user_id,
            remove=[],
            add=[Membership(user_id=event.user_id, org_id=event.org_id, role=event.role)],
            expected_marker=None,
            remove_marker=None,
            set_marker=1,
            event_id=user.event_id,
        ),
    )
    await env.run(rows.apply_row, ApplyRowInput(event=user, zed_token=written.zed_token))
    outcome = await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    assert (outcome.status, outcome.zed_token) == ("synced", written.zed_token)
    await assert_synced(pipeline, event, written.zed_token or "")


async def test_wait_for_row_returns_before_permissions(pipeline: Pipeline) -> None:
    event = new_event()
    outcome = await create_user(
        event, wait=WaitFor.ROW, client=pipeline.client, task_queue=pipeline.task_queue
    )
    assert outcome.status == "pending" and outcome.zed_token is None
    assert await user_row(pipeline.pool, event.user_id) is not None  # committed already
    # Delivering the same event again waits for its outcome: duplicates are no-ops.
    result = await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, event, result.zed_token)


async def test_wait_for_start_returns_at_once(pipeline: Pipeline) -> None:
    event = new_event()
    outcome = await create_user(
        event, wait=WaitFor.START, client=pipeline.client, task_queue=pipeline.task_queue
    )
    assert outcome.status == "started"
    # Delivering the same event again waits for its outcome: duplicates are no-ops.
    result = await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, event, result.zed_token)


async def test_wait_for_start_is_durable_before_any_worker_runs(engines: Engines) -> None:
    """START returns on the server's answer (signal-with-start): no worker polls the queue yet,
    so nothing is written; a worker started afterwards applies the event it holds."""
    client, task_queue = engines.client, f"no-worker-yet-{uuid.uuid4().hex[:8]}"
    event = new_event()
    outcome = await asyncio.wait_for(
        create_user(event, wait=WaitFor.START, client=client, task_queue=task_queue), 30
    )
    assert outcome.status == "started"
    history = await client.get_workflow_handle(outcome.workflow_id).fetch_history()
    kinds = [e.event_type for e in history.events]
    assert kinds == [
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    ]
    assert await user_row(engines.app_db, event.user_id) is None
    async with engines.pipeline(task_queue) as pipeline:
        # The same event again, waiting for its outcome: the signalled delivery is the one applied.
        result = await create_user(event, client=client, task_queue=task_queue)
        await assert_synced(pipeline, event, result.zed_token or "")


async def test_duplicate_events_are_no_ops(pipeline: Pipeline) -> None:
    event = new_event()
    # Three deliveries at once (while the first run is open), then one after it closed.
    concurrent = await asyncio.gather(
        *(
            create_user(event, wait=wait, client=pipeline.client, task_queue=pipeline.task_queue)
            for wait in (WaitFor.PERMISSIONS, WaitFor.ROW, WaitFor.PERMISSIONS)
        )
    )
    late = await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    tokens = {o.zed_token for o in (*concurrent, late) if o.zed_token}
    assert len(tokens) == 1
    await assert_synced(pipeline, event, tokens.pop())
    rows = await pipeline.pool.fetchval(
        "SELECT count(*) FROM users WHERE org_id = $1", event.org_id
    )
    assert rows == 1
    runs = [
        w
        async for w in pipeline.client.list_workflows(
            f"WorkflowId = '{user_workflow_id(event.user_id)}'"
        )
    ]
    assert len(runs) == 1


async def test_duplicate_email_fails_clearly_and_leaves_nothing(pipeline: Pipeline) -> None:
    first = new_event()
    await create_user(first, client=pipeline.client, task_queue=pipeline.task_queue)
    second = new_event(email=first.email.upper())
    with pytest.raises(UserSyncFailed) as caught:
        await create_user(second, client=pipeline.client, task_queue=pipeline.task_queue)
    assert caught.value.error_type == "DuplicateEmail"
    assert first.email.lower() not in caught.value.message.lower()  # no PII in the failure
    await assert_neither(pipeline, second)
    # The first user is untouched.
    assert await relationships_of(pipeline.spicedb, first.user_id) == [(first.org_id, "member")]


async def test_a_worker_without_the_sandbox_syncs_and_compensates_alike(
    engines: Engines, task_queue: str
) -> None:
    """``SPICESYNC_WORKFLOW_SANDBOX=false``: same effects, same recorded steps, same failure."""
    settings = worker_settings(engines.database_url, engines.spicedb_server).model_copy(
        update={"workflow_sandbox": False}
    )
    client, spicedb = engines.client, engines.spicedb
    async with engines.pipeline(task_queue, settings) as pipeline:
        first = new_event()
        outcome = await create_user(
            first, wait=WaitFor.PERMISSIONS, client=client, task_queue=task_queue
        )
        await assert_synced(pipeline, first, outcome.zed_token or "")
        history = await client.get_workflow_handle(outcome.workflow_id).fetch_history()
        assert local_steps(history) == ["write_memberships"]
        second = new_event(email=first.email.upper())
        with pytest.raises(UserSyncFailed) as caught:
            await create_user(second, client=client, task_queue=task_queue)
        assert caught.value.error_type == "DuplicateEmail"
        await assert_neither(pipeline, second)
        assert await relationships_of(spicedb, first.user_id) == [(first.org_id, "member")]


async def test_invalid_input_is_rejected_before_anything_starts(pipeline: Pipeline) -> None:
    event = new_event(email="not an email", org_id="bad org")
    with pytest.raises(InvalidUserInput, match=r"email:.*org_id:"):
        await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    with pytest.raises(RPCError):
        await pipeline.client.get_workflow_handle(user_workflow_id(event.user_id)).describe()
    await assert_neither(pipeline, event)


async def test_spicedb_outage_waits_then_completes(
    pipeline: Pipeline, spicedb_server: SpiceDBServer, patient_local_steps: None
) -> None:
    # The insert's local try gets the time it needs; the write's fails by its own SpiceDB
    # deadline all the same.
    event = new_event()
    spicedb_server.pause()
    try:
        # The call hits its deadline and is retried: the workflow waits, durably.
        await start_held(pipeline.client, pipeline.task_queue, event)
        row = await user_row(pipeline.pool, event.user_id)
        assert row is not None and row["sync_status"] == "pending"
    finally:
        spicedb_server.resume()
    # Delivering the same event again waits for its outcome: duplicates are no-ops.
    result = await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, event, result.zed_token)
    # The event came with the deliver signal, so its insert ran locally; the SpiceDB write
    # first failed as a local activity, then went on as a normal, visible activity.
    history = await pipeline.client.get_workflow_handle(result.workflow_id).fetch_history()
    assert local_steps(history) == ["insert_created_row", "write_memberships"]
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled == ["write_memberships"]


async def test_cancel_during_outage_compensates_to_neither(
    pipeline: Pipeline, spicedb_server: SpiceDBServer
) -> None:
    event = new_event()
    spicedb_server.pause()
    try:
        # The call hits its deadline and is retried: the workflow waits, durably.
        outcome = await start_held(pipeline.client, pipeline.task_queue, event)
        handle = pipeline.client.get_workflow_handle(outcome.workflow_id)
        await handle.cancel()
    finally:
        spicedb_server.resume()
    await eventually(
        lambda: _closed_as(pipeline.client, outcome.workflow_id, WorkflowExecutionStatus.CANCELED),
        timeout=60,
    )
    await assert_neither(pipeline, event)


async def test_cancel_during_outage_leaves_a_grant_that_existed_before(
    pipeline: Pipeline, spicedb_server: SpiceDBServer
) -> None:
    """The write was planned from the App DB's prediction (no grant) and never got through:
    the rollback must leave SpiceDB as it was, the grant included (SpiceDB issue #1903)."""
    event = new_event()
    # The very membership the event grants: a blind rollback of the prediction would revoke it.
    grant = Membership(user_id=event.user_id, org_id=event.org_id, role=event.role)
    await grant_outside_spicesync(pipeline.spicedb, grant)
    spicedb_server.pause()
    try:
        outcome = await start_held(pipeline.client, pipeline.task_queue, event)
        await pipeline.client.get_workflow_handle(outcome.workflow_id).cancel()
    finally:
        spicedb_server.resume()
    await eventually(
        lambda: _closed_as(pipeline.client, outcome.workflow_id, WorkflowExecutionStatus.CANCELED),
        timeout=60,
    )
    assert await user_row(pipeline.pool, event.user_id) is None
    assert await relationships_of(pipeline.spicedb, event.user_id) == [(grant.org_id, grant.role)]


async def _closed_as(client: Client, workflow_id: str, status: WorkflowExecutionStatus) -> bool:
    return (await client.get_workflow_handle(workflow_id).describe()).status == status


async def test_wrong_preshared_key_is_refused(spicedb_server: SpiceDBServer) -> None:
    bad = spicedb_server.client(key="not-the-key")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bad.ReadSchema(ReadSchemaRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await bad.close()


async def test_worker_refuses_to_start_with_a_key_spicedb_rejects(
    client: Client, task_queue: str, database_url: str, spicedb_server: SpiceDBServer
) -> None:
    settings = worker_settings(database_url, spicedb_server, key="not-the-key").model_copy(
        update={"task_queue": task_queue}
    )
    with pytest.raises(SpiceDBKeyRefused, match="UNAUTHENTICATED"):
        await asyncio.wait_for(run_worker(settings, stop=asyncio.Event(), client=client), 30)


async def test_a_key_gone_bad_holds_syncs_without_rolling_back_then_they_complete(
    client: Client,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    spicedb_server: SpiceDBServer,
) -> None:
    """A worker whose key SpiceDB stops accepting (rotated under it): the event waits, visibly,
    and a worker with the right key completes it; the user's row is never rolled back."""
    event = new_event()
    bad = worker_settings(database_url, spicedb_server, key="not-the-key")
    async with (
        open_resources(bad) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        outcome = await start_held(client, task_queue, event)
        described = await client.get_workflow_handle(outcome.workflow_id).describe()
        # Retried as unavailable (the message, encrypted here, names UNAUTHENTICATED).
        failure = described.raw_description.pending_activities[0].last_failure
        assert failure.application_failure_info.type == "SpiceDBUnavailable"
        row = await user_row(app_db, event.user_id)
        assert row is not None and row["sync_status"] == "pending"
    good = worker_settings(database_url, spicedb_server)
    async with (
        open_resources(good) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        result = await create_user(event, client=client, task_queue=task_queue)
    check = spicedb_server.client()
    try:
        await assert_synced(Pipeline(client, task_queue, app_db, check), event, result.zed_token)
    finally:
        await check.close()


async def test_spicedb_killed_then_restarted_waits_then_completes(
    client: Client, task_queue: str, database_url: str, app_db: asyncpg.Pool, tmp_path: Path
) -> None:
    # A SpiceDB of this test's own, so killing it disturbs no other test.
    port, key, log = free_port(), f"k-{uuid.uuid4().hex}", tmp_path / "spicedb.log"
    endpoint = f"127.0.0.1:{port}"

    async def start() -> int:
        pid, _ = start_spicedb(port=port, preshared_key=key, log=log)
        wait_for_port("127.0.0.1", port, pid=pid, timeout=60, log=log)
        # The memory datastore comes back empty; writing the schema is what `stack up` does.
        await prepare_spicedb(endpoint, key)
        return pid

    pid = await start()
    server = SpiceDBServer(endpoint, key, pid, log)
    event = new_event()
    async with (
        open_resources(worker_settings(database_url, server)) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        stop_pid(pid)  # connections are now refused: UNAVAILABLE
        await start_held(client, task_queue, event)
        pid = await start()
        try:
            result = await create_user(event, client=client, task_queue=task_queue)
            check = connect_spicedb(endpoint, key)
            try:
                await assert_synced(
                    Pipeline(client, task_queue, app_db, check), event, result.zed_token
                )
            finally:
                await check.close()
        finally:
            stop_pid(pid)


async def test_worker_starts_while_spicedb_is_down(
    client: Client,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    spicedb_server: SpiceDBServer,
) -> None:
    settings = worker_settings(database_url, spicedb_server).model_copy(
        update={"task_queue": task_queue}
    )
    stop = asyncio.Event()
    spicedb_server.pause()
    try:
        worker = asyncio.create_task(run_worker(settings, stop=stop, client=client))
        await asyncio.sleep(6)  # past the start-up schema check's 5 s deadline
        assert not worker.done(), "the worker gave up because SpiceDB was down"
    finally:
        spicedb_server.resume()
    event = new_event()
    done = await create_user(event, client=client, task_queue=task_queue)
    stop.set()
    await asyncio.wait_for(worker, 30)
    check = spicedb_server.client()
    try:
        await assert_synced(
            Pipeline(client, task_queue, app_db, check), event, done.zed_token or ""
        )
    finally:
        await check.close()
