"""Issue 18: nothing of an event is written before Temporal has durably accepted it; a creation
that never finished is found (``stuck``, reconcile) and removed; the starter retries a refused
call until its deadline, then raises one typed error. Real Temporal, PostgreSQL and SpiceDB."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.user_rows import UserRowActivities
from chaos.engines import TemporalServer
from spicesync.codec import EncryptionCodec, encrypted_data_converter
from spicesync.models import InsertCreatedRowInput, ReconcileInput, ReconcileReport
from spicesync.settings import Settings
from starters.reconcile import start_reconcile
from starters.stuck import UNFINISHED_STAGE, find_stuck, find_unfinished
from starters.user_events import (
    EventNotAccepted,
    create_user,
    creation_event,
)
from tests.conftest import SpiceDBServer
from tests.integration.conftest import (
    OwnStores,
    Pipeline,
    assert_neither,
    eventually,
    new_event,
    relationships_of,
    start_held,
    temporal_through_proxy,
    user_row,
)


async def _stop(process: asyncio.subprocess.Process | None) -> None:
    if process is not None and process.returncode is None:
        process.kill()
        await process.wait()


def _worker_env(temporal: str, stores: OwnStores, keys: str, queue: str) -> dict[str, str]:
    settings = Settings(temporal_address=temporal, encryption_keys=SecretStr(keys), _env_file=None)
    return settings.worker_environment(
        task_queue=queue,
        database_url=stores.database_url,
        spicedb_endpoint=stores.server.endpoint,
        spicedb_key=stores.server.preshared_key,
    )


async def _spawn(env: dict[str, str], *module: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *module,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("wait", ["accepted", "start"])
@pytest.mark.parametrize("kind", ["created", "role_changed"])
async def test_a_worker_lost_right_after_a_write_leaves_no_half_written_user(
    kind: str,
    wait: str,
    own_stores: OwnStores,
    test_codec: EncryptionCodec,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    """The worker dies the instant an event's first write lands (a creation's row commit, a
    role change's SpiceDB write), the app that sent the event dies too, and the Temporal server
    restarts: an update that is not yet accepted lives only in the server's memory (under
    overload, a cache eviction does the same). Before the fix that write ran as a local
    activity inside the workflow task that was accepting the event, so the event was lost and
    the next workflow task had none: a pending row (or a new role in SpiceDB only) that nothing
    would ever finish or undo. Now the event is durably accepted before any write, the app's
    call was answered before the write, and the next worker finishes the sync.

    With ``--wait=accepted`` (an update) the write is the event's first normal activity; with
    ``--wait=start`` (the deliver signal, in history before any worker sees it) it runs
    locally inside the workflow task, which dies with the worker, times out and is run again
    from the signal by the next worker."""
    temporal = TemporalServer(tmp_path)
    await temporal.start()
    env = _worker_env(temporal.address, own_stores, test_codec_keys, task_queue)
    client = await Client.connect(
        temporal.address, data_converter=encrypted_data_converter(test_codec)
    )
    user = new_event(role="member")
    want = (1, "member") if kind == "created" else (2, "admin")
    healthy: asyncio.subprocess.Process | None = None
    dying: asyncio.subprocess.Process | None = None
    try:
        if kind == "created":
            step = "insert_created_row"
            command = [
                "create",
                f"--user-id={user.user_id}",
                f"--email={user.email}",
                f"--name={user.name}",
                "--role=member",
            ]
        else:
            healthy = await _spawn(env, "spicesync", "worker")
            created = await create_user(user, client=client, task_queue=task_queue)
            assert created.status == "synced"
            healthy.terminate()  # graceful: the user's workflow stays open, waiting for events
            await healthy.wait()
            step = "write_memberships"
            command = ["update", f"--user-id={user.user_id}", "--role=admin", "--version=2"]
        dying = await _spawn(env, "tests.integration.worker_dies_after_write", step)
        # The app's call, in a process of its own: once the app is gone, nobody sends it again.
        app = await _spawn(
            env, "spicesync", "users", *command, f"--org={user.org_id}", f"--wait={wait}"
        )
        assert await asyncio.wait_for(dying.wait(), 60) == -9
        try:
            answered = await asyncio.wait_for(app.wait(), 5) == 0
        except TimeoutError:
            answered = False
        await _stop(app)
        temporal.kill()
        await temporal.start()
        healthy = await _spawn(env, "spicesync", "worker")

        async def settled() -> bool:
            row = await user_row(own_stores.pool, user.user_id)
            return (
                row is not None
                and row["sync_status"] == "synced"
                and (row["version"], row["role"]) == want
                and await relationships_of(own_stores.spicedb, user.user_id)
                == [(user.org_id, want[1])]
            )

        # The dead worker's activity (15 s) or workflow task (10 s) times out and is retried
        # on the new one.
        await eventually(settled, timeout=120)
        if wait == "start" or kind != "created":
            # The call was answered before the write. (A new user's first update is answered
            # once its insert, which also reads the user's state, is done: durably accepted,
            # as the recovery shows, but not answered before the worker died.)
            assert answered
    finally:
        await _stop(dying)
        await _stop(healthy)
        temporal.kill()


async def _unfinished_row(stores: OwnStores, *, age_seconds: int) -> str:
    """A row as a creation that was never accepted leaves it: inserted, pending, no sync."""
    user = new_event()
    rows = UserRowActivities(stores.pool)
    await ActivityEnvironment().run(
        rows.insert_created_row, InsertCreatedRowInput(event=creation_event(user))
    )
    await stores.pool.execute(
        "UPDATE users SET created_at = now() - make_interval(secs => $2) WHERE id = $1",
        uuid.UUID(user.user_id),
        age_seconds,
    )
    return user.user_id


async def _reconcile(pipeline: Pipeline, *, dry_run: bool) -> ReconcileReport:
    handle = await start_reconcile(
        ReconcileInput(dry_run=dry_run, unfinished_after_seconds=60),
        client=pipeline.client,
        task_queue=pipeline.task_queue,
        workflow_id=f"reconcile-{uuid.uuid4()}",
    )
    return await handle.result()


async def test_an_unfinished_creation_is_listed_by_stuck_and_removed_by_the_reconcile(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    old = await _unfinished_row(own_stores, age_seconds=300)
    young = await _unfinished_row(own_stores, age_seconds=0)  # may still be a live creation

    listed = await find_unfinished(
        own_pipeline.client, own_stores.pool, older_than=timedelta(seconds=60)
    )
    assert [(s.user_id, s.stage) for s in listed] == [(old, UNFINISHED_STAGE)]

    dry = await _reconcile(own_pipeline, dry_run=True)
    assert dry.found.unfinished == 1 and dry.samples["unfinished"] == [old]
    assert dry.in_flight_skipped == 1  # the young one: not judged yet
    assert await user_row(own_stores.pool, old) is not None  # a dry run changes nothing

    applied = await _reconcile(own_pipeline, dry_run=False)
    assert applied.found.unfinished == 1 and applied.repairs.removed_unfinished == 1
    assert await user_row(own_stores.pool, old) is None
    assert await relationships_of(own_stores.spicedb, old) == []
    assert await user_row(own_stores.pool, young) is not None
    assert (
        await find_unfinished(
            own_pipeline.client, own_stores.pool, older_than=timedelta(seconds=60)
        )
        == []
    )


async def test_a_live_sync_with_a_pending_row_is_stuck_not_unfinished(
    pipeline: Pipeline, spicedb_server: SpiceDBServer
) -> None:
    """A creation retrying through a SpiceDB outage holds a pending row: it is a live sync that
    `stuck` lists as such, and nothing may remove its row."""
    event = new_event()
    spicedb_server.pause()
    try:
        outcome = await start_held(pipeline.client, pipeline.task_queue, event)
        await asyncio.sleep(1.5)  # let visibility catch up with the stage

        async def listed_as_stuck() -> bool:
            stuck = await find_stuck(pipeline.client, older_than=timedelta(seconds=1))
            return outcome.workflow_id in {s.workflow_id for s in stuck}

        await eventually(listed_as_stuck, timeout=30)
        unfinished = await find_unfinished(
            pipeline.client, pipeline.pool, older_than=timedelta(seconds=0)
        )
        assert event.user_id not in {s.user_id for s in unfinished}
    finally:
        spicedb_server.resume()
    result = await create_user(event, client=pipeline.client, task_queue=pipeline.task_queue)
    assert result.status == "synced"


async def test_the_starter_retries_refused_calls_until_its_deadline(
    temporal_env: WorkflowEnvironment, pipeline: Pipeline
) -> None:
    """Temporal unreachable: the call is retried until ``accept_within``, then raises
    EventNotAccepted (nothing written); a call still retrying when Temporal is back succeeds."""
    async with temporal_through_proxy(temporal_env.client) as (proxy, app):
        await proxy.refuse()
        lost = new_event()
        began = time.monotonic()
        with pytest.raises(EventNotAccepted) as refused:
            await create_user(
                lost,
                client=app,
                task_queue=pipeline.task_queue,
                accept_within=timedelta(seconds=3),
            )
        assert 2.5 < time.monotonic() - began < 30
        assert refused.value.event_id.startswith(lost.user_id)
        await assert_neither(pipeline, lost)

        kept = new_event()
        call = asyncio.create_task(
            create_user(
                kept,
                client=app,
                task_queue=pipeline.task_queue,
                accept_within=timedelta(seconds=60),
            )
        )
        await asyncio.sleep(2)
        assert not call.done()
        await proxy.restore()
        outcome = await asyncio.wait_for(call, 60)
        assert outcome.status == "synced"
