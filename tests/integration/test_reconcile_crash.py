"""Reconcile and backfill from outside: a reconcile whose worker is SIGKILLed mid-scan resumes
and repairs each user once; the schedule; the commands, with a worker process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

from authzed.api.v1 import WatchRequest
from pydantic import SecretStr
from temporalio.client import Client, ScheduleOverlapPolicy
from temporalio.testing import WorkflowEnvironment

from spicesync.constants import user_workflow_id
from spicesync.models import ReconcileInput, ReconcileReport
from spicesync.settings import Settings
from spicesync.temporal import workers_polling
from starters.reconcile import ensure_reconcile_schedule, start_reconcile
from tests.integration.conftest import OwnStores, Pipeline, eventually
from tests.integration.test_reconcile import holds_role, insert_unsynced
from workflows.reconcile import ReconcileWorkflow


def worker_env(
    env: WorkflowEnvironment, stores: OwnStores, keys: str, task_queue: str, state: Path
) -> dict[str, str]:
    settings = Settings(
        temporal_address=env.client.service_client.config.target_host,
        temporal_namespace=env.client.namespace,
        encryption_keys=SecretStr(keys),
        _env_file=None,
    )
    environment = settings.worker_environment(
        task_queue=task_queue,
        database_url=stores.database_url,
        spicedb_endpoint=stores.server.endpoint,
        spicedb_key=stores.server.preshared_key,
    )
    # Not the repository's .spicesync: this worker must use only what is set here.
    return environment | {"SPICESYNC_STATE_DIR": str(state)}


async def test_a_reconcile_killed_mid_scan_resumes_without_repeating_repairs(
    client: Client,
    temporal_env: WorkflowEnvironment,
    own_stores: OwnStores,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    env = worker_env(temporal_env, own_stores, test_codec_keys, task_queue, tmp_path)
    cli = [sys.executable, "-m", "spicesync", "worker"]
    users = await insert_unsynced(own_stores.pool, 300, "crash-org")

    writes: Counter[str] = Counter()

    async def watch() -> None:
        async for response in own_stores.spicedb.Watch(
            WatchRequest(optional_object_types=["organization"])
        ):
            metadata = dict(response.optional_transaction_metadata.items())
            if str(metadata.get("event_id", "")).startswith("reconcile:") and response.updates:
                writes[str(metadata["workflow_id"])] += 1

    watcher = asyncio.create_task(watch())
    first = await asyncio.create_subprocess_exec(
        *cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    second: asyncio.subprocess.Process | None = None
    try:
        handle = await start_reconcile(
            ReconcileInput(dry_run=False, page_size=50),
            client=client,
            task_queue=task_queue,
            workflow_id=f"reconcile-{uuid.uuid4()}",
        )

        async def some_repaired() -> bool:
            progress = await handle.query(ReconcileWorkflow.progress)
            return progress.repairs.repaired >= 60 and progress.phase == "app_db"

        await eventually(some_repaired, timeout=120)
        first.kill()  # SIGKILL in the middle of the scan and of a batch of repairs
        await first.wait()
        second = await asyncio.create_subprocess_exec(
            *cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        report: ReconcileReport = await asyncio.wait_for(handle.result(), timeout=150)

        await asyncio.sleep(0.5)  # let Watch deliver the last writes
    finally:
        watcher.cancel()
        for process in (first, second):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
    assert report.found.unsynced == 300 and report.repairs.failed == 0
    assert all(await holds_role(own_stores.spicedb, [(u, "crash-org", "member") for u in users]))
    # Each user's relationships were written by the reconcile exactly once.
    assert {user_workflow_id(u) for u in users} == set(writes)
    assert set(writes.values()) == {1}


async def test_the_reconcile_schedule_is_created_updated_and_runs(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    p = own_pipeline
    schedule_id = f"reconcile-schedule-{uuid.uuid4()}"
    await insert_unsynced(own_stores.pool, 3, "scheduled-org")
    request = ReconcileInput(dry_run=True, prune_cap=10)
    await ensure_reconcile_schedule(
        timedelta(hours=1),
        request,
        client=p.client,
        task_queue=p.task_queue,
        schedule_id=schedule_id,
    )
    # Running it again updates the schedule in place (idempotent).
    await ensure_reconcile_schedule(
        timedelta(minutes=30),
        request.model_copy(update={"dry_run": False}),
        client=p.client,
        task_queue=p.task_queue,
        schedule_id=schedule_id,
    )
    handle = p.client.get_schedule_handle(schedule_id)
    try:
        described = await handle.describe()
        assert described.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert described.schedule.spec.intervals[0].every == timedelta(minutes=30)
        await handle.trigger()

        async def ran() -> bool:
            return bool((await handle.describe()).info.recent_actions)

        await eventually(ran, timeout=30)
        action = (await handle.describe()).info.recent_actions[0].action
        run = p.client.get_workflow_handle(action.workflow_id)  # type: ignore[attr-defined]
        report = ReconcileReport.model_validate(await run.result())
        assert not report.dry_run and report.repairs.repaired == 3
    finally:
        await handle.delete()


async def test_the_commands_print_figures_and_refuse_without_a_worker(
    temporal_env: WorkflowEnvironment,
    own_stores: OwnStores,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    env = worker_env(temporal_env, own_stores, test_codec_keys, task_queue, tmp_path)
    cli = [sys.executable, "-m", "spicesync"]

    async def run(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            *cli, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, _, err = await run("reconcile")
    assert code == 2 and "no worker polls task queue" in err

    users = await insert_unsynced(own_stores.pool, 700, "cli-org")
    worker = await asyncio.create_subprocess_exec(
        *cli, "worker", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await eventually(lambda: _polled(temporal_env.client, task_queue), timeout=30)
        code, out, err = await run("backfill", "--batch-size", "200", "--json")
        assert code == 0, err
        figures = json.loads(out)
        # No user sync of an earlier release runs: one relationship per user, no markers.
        assert figures["users_written"] == 700 and figures["relationships_written"] == 700
        assert figures["version_markers"] is False
        assert figures["rows_scanned_per_second"] > 0
        assert figures["relationships_written_per_second"] > 0
        assert "backfill [" in err and "700/700 users" in err  # the progress bar

        code, out, err = await run("reconcile", "--json")
        assert code == 0, err
        report = ReconcileReport.model_validate_json(out)
        assert report.dry_run and report.rows_scanned == 700
        assert report.message == "SpiceDB matches the App DB"
        code, out, _ = await run("reconcile")
        assert "dry run: SpiceDB matches the App DB" in out
        assert "700 App DB rows (" in out and "1400 SpiceDB relationships" not in out
    finally:
        worker.kill()
        await worker.wait()
    assert all(await holds_role(own_stores.spicedb, [(u, "cli-org", "member") for u in users]))


async def _polled(client: Client, task_queue: str) -> bool:
    return await workers_polling(client, task_queue) > 0
