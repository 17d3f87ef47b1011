"""Issue 14: a `spicesync worker` process drains on SIGTERM and exits 0, and its /readyz follows
Temporal, PostgreSQL and SpiceDB. Real engines; the outages are the fault proxy refusing
connections, as a crashed host does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from chaos.proxy import FaultProxy, postgres_route
from spicesync.constants import user_workflow_id
from spicesync.stack.processes import free_port, stop_process
from spicesync.temporal import workers_polling
from starters.user_events import SyncOutcome, WaitFor, create_user
from tests.integration.conftest import OwnStores, eventually, new_event, user_row
from tests.integration.test_reconcile_crash import worker_env

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "spicesync", "worker"]


async def _polling(client: Client, task_queue: str) -> bool:
    return await workers_polling(client, task_queue) > 0


async def _spawn(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *CLI, env=env, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.fixture
async def blocker(own_stores: OwnStores) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, to hold a row lock the worker's insert waits on."""
    conn = await asyncpg.connect(own_stores.database_url)
    yield conn
    await conn.close()


async def test_sigterm_lets_the_activity_in_flight_finish_then_the_worker_exits_0(
    client: Client,
    temporal_env: WorkflowEnvironment,
    own_stores: OwnStores,
    blocker: asyncpg.Connection,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    """A creation's first write (the row insert, a normal activity) is held mid-statement by an
    uncommitted row with the same key, the worker gets SIGTERM, then the row lock goes away:
    the insert completes inside the grace period and is reported to Temporal, and the process
    exits 0. Before the fix the SDK's grace was 0 ("will wait 0:00:00 before cancelling
    activities"): the insert was cancelled at SIGTERM and no row was ever written."""
    env = worker_env(temporal_env, own_stores, test_codec_keys, task_queue, tmp_path) | {
        "SPICESYNC_SHUTDOWN_GRACE_SECONDS": "120"
    }
    log = tmp_path / "worker.log"
    worker = await _spawn(env, log)
    user = new_event()
    handle = client.get_workflow_handle(user_workflow_id(user.user_id))
    call: asyncio.Future[SyncOutcome] | None = None
    try:
        await eventually(lambda: _polling(client, task_queue), timeout=60)
        lock = blocker.transaction()
        await lock.start()
        # The same primary key, uncommitted: the worker's INSERT ... ON CONFLICT waits on it.
        await blocker.execute(
            "INSERT INTO users (id, email, name, org_id, role) VALUES ($1, $2, 'Lock', 'lock',"
            " 'member')",
            uuid.UUID(user.user_id),
            f"lock-{user.user_id[:8]}@example.com",
        )
        # An update (ACCEPTED), so the insert is a normal activity: a WaitFor.START signal is
        # in history at once, so its insert would run locally, inside a workflow task. A new
        # run's first update is answered once the insert is done: it runs on its own.
        call = asyncio.ensure_future(
            create_user(user, wait=WaitFor.ACCEPTED, client=client, task_queue=task_queue)
        )
        me = await blocker.fetchval("SELECT pg_backend_pid()")

        async def insert_waits_on_the_lock() -> bool:
            waiting = await own_stores.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", me
            )
            return bool(waiting)

        await eventually(insert_waits_on_the_lock, timeout=60)
        worker.terminate()

        async def shutdown_began() -> bool:
            return "Beginning worker shutdown" in log.read_text(errors="replace")

        await eventually(shutdown_began, timeout=60)
        await lock.rollback()  # the insert goes ahead now, if it was let finish
        assert await asyncio.wait_for(worker.wait(), 120) == 0
    finally:
        if call is not None:
            # Its answer needed a workflow task after the insert, with no worker left to run it.
            call.cancel()
            with contextlib.suppress(BaseException):
                await call
        await stop_process(worker, timeout=5)
    text = log.read_text(errors="replace")
    row = await user_row(own_stores.pool, user.user_id)
    assert row is not None, text
    assert (row["email"], row["sync_status"]) == (user.email, "pending")
    events = [event async for event in handle.fetch_history_events()]
    assert any(e.HasField("activity_task_completed_event_attributes") for e in events)
    assert "will wait 0:02:00 before cancelling activities" in text, text
    await handle.terminate("test over")


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body; ``(0, {})`` while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


async def test_readyz_follows_temporal_postgres_and_spicedb(
    client: Client,
    temporal_env: WorkflowEnvironment,
    own_stores: OwnStores,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    """/readyz is 200 with all three up, 503 naming the one that is down while it is down, and
    200 again when it is back; /livez stays 200 throughout. Before the fix nothing listened."""
    pg_target, through = postgres_route(own_stores.database_url)
    spicedb_host, _, spicedb_port = own_stores.server.endpoint.rpartition(":")
    temporal_host, _, temporal_port = (
        temporal_env.client.service_client.config.target_host.rpartition(":")
    )
    health = f"127.0.0.1:{free_port()}"
    async with (
        FaultProxy(pg_target) as postgres,
        FaultProxy((spicedb_host, int(spicedb_port))) as spicedb,
        FaultProxy((temporal_host, int(temporal_port))) as temporal,
    ):
        env = worker_env(temporal_env, own_stores, test_codec_keys, task_queue, tmp_path) | {
            "DATABASE_URL": through(postgres.port),
            "SPICEDB_ENDPOINT": spicedb.address,
            "TEMPORAL_ADDRESS": temporal.address,
            "SPICESYNC_HEALTH_ADDRESS": health,
        }
        log = tmp_path / "worker.log"
        worker = await _spawn(env, log)
        # In a thread: the proxies serve the worker from this event loop.
        probe = lambda path: asyncio.to_thread(get_json, f"http://{health}{path}")  # noqa: E731

        async def ready(down: str | None = None) -> bool:
            status, body = await probe("/readyz")
            checks = body.get("checks", {})
            assert isinstance(checks, dict)
            if down is None:
                return status == 200 and body["status"] == "ready"
            others_ok = all(v == "ok" for k, v in checks.items() if k != down)
            return status == 503 and checks.get(down, "").startswith("failed") and others_ok

        try:
            await eventually(lambda: _polling(client, task_queue), timeout=60)
            await eventually(ready, timeout=60)
            assert (await probe("/readyz"))[1]["checks"] == {
                "temporal": "ok",
                "postgres": "ok",
                "spicedb": "ok",
            }
            for name, proxy in (
                ("postgres", postgres),
                ("spicedb", spicedb),
                ("temporal", temporal),
            ):
                await proxy.refuse()
                await eventually(lambda name=name: ready(down=name), timeout=60)
                assert (await probe("/livez"))[0] == 200
                await proxy.restore()
                await eventually(ready, timeout=60)
            assert (await probe("/nope"))[0] == 404
            worker.terminate()
            assert await asyncio.wait_for(worker.wait(), 60) == 0
        finally:
            await stop_process(worker, timeout=5)
    text = log.read_text(errors="replace")
    assert own_stores.server.preshared_key not in text
