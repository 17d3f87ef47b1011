"""No email or name reaches a span, a log line or the metrics page, whatever goes wrong.

A ``spicesync worker`` process and the ``spicesync users`` command run as in production, each
exporting its spans to a JSON-lines file (the same spans an OTLP collector would receive).
The test drives the failures whose messages quote rows or come from the stores: a creation
refused for a duplicate email, one refused by a CHECK constraint (PostgreSQL's DETAIL quotes
the whole row), a SpiceDB refusal, and a PostgreSQL outage; then it reads every exported span,
every line the processes printed and the metrics page, and looks for every email and name.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from chaos.leaks import find_leaks
from chaos.proxy import FaultProxy, postgres_route
from spicesync.constants import user_workflow_id
from spicesync.models import CreateUserInput, ResumeInput
from spicesync.spicedb import load_schema, write_schema
from spicesync.stack.processes import free_port, stop_process
from spicesync.temporal import workers_polling
from tests.integration.conftest import OwnStores, eventually, new_event, retrying
from tests.integration.test_reconcile_crash import worker_env
from workflows.user_sync import STAGE, UserSyncWorkflow

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "spicesync"]

# A schema without the `admin` relation: SpiceDB refuses an admin's membership.
_NO_ADMIN = (
    load_schema()
    .replace("relation admin: user", "")
    .replace("permission manage = admin", "permission manage = member")
    .replace("permission view = admin + member", "permission view = member")
)


def _create(user: CreateUserInput, env: dict[str, str], wait: str = "permissions") -> str:
    """``spicesync users create`` for ``user``; its stdout and stderr."""
    done = subprocess.run(
        [
            *CLI,
            "users",
            "create",
            "--user-id",
            user.user_id,
            "--email",
            user.email,
            "--name",
            user.name,
            "--org",
            user.org_id,
            "--role",
            user.role,
            "--wait",
            wait,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout + done.stderr


def _outcome(output: str) -> dict[str, Any]:
    line = next(line for line in output.splitlines() if line.startswith("{"))
    return dict(json.loads(line))


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_refusals_and_an_outage_leave_no_email_or_name_in_spans_logs_or_metrics(
    client: Client,
    temporal_env: WorkflowEnvironment,
    own_stores: OwnStores,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:10]
    first = new_event(email=f"zelda.{tag}@example.com", name="Zelda Quartermaine", org_id=org)
    duplicate = new_event(email=first.email.upper(), name="Yorick Pennyworth", org_id=org)
    checked = new_event(email=f"quentin.{tag}@example.com", name="Reserved Quentin", org_id=org)
    refused = new_event(
        email=f"wilhelmina.{tag}@example.com", name="Wilhelmina Ortiz", org_id=org, role="admin"
    )
    outage = new_event(email=f"xavier.{tag}@example.com", name="Xavier Lindqvist", org_id=org)
    users = [first, duplicate, checked, refused, outage]

    # The test database's own rule, refusing a row by its name: PostgreSQL's DETAIL then quotes
    # the whole failing row (email and name included).
    await own_stores.pool.execute(
        "ALTER TABLE users ADD CONSTRAINT name_not_reserved CHECK (name NOT LIKE 'Reserved %')"
    )
    metrics = f"127.0.0.1:{free_port()}"
    worker_traces, app_traces = tmp_path / "worker-traces.jsonl", tmp_path / "app-traces.jsonl"
    worker_log, printed = tmp_path / "worker.log", list[str]()
    target, through = postgres_route(own_stores.database_url)
    async with FaultProxy(target) as proxy:
        env = worker_env(temporal_env, own_stores, test_codec_keys, task_queue, tmp_path)
        for otlp in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            env.pop(otlp, None)  # spans go to the files read below
        env |= {"DATABASE_URL": through(proxy.port), "SPICESYNC_TASK_QUEUE": task_queue}
        app_env = env | {"SPICESYNC_TRACE_FILE": str(app_traces)}
        worker_vars = env | {
            "SPICESYNC_TRACE_FILE": str(worker_traces),
            "SPICESYNC_METRICS_ADDRESS": metrics,
        }
        with worker_log.open("wb") as log:
            worker = await asyncio.create_subprocess_exec(
                *CLI, "worker", env=worker_vars, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            await eventually(lambda: _polling(client, task_queue), timeout=60)

            async def create(user: CreateUserInput, wait: str = "permissions") -> dict[str, Any]:
                # In a thread: the fault proxy serves the worker from this event loop.
                output = await asyncio.to_thread(_create, user, app_env, wait)
                printed.append(output)
                return _outcome(output)

            # (a) A duplicate email, refused.
            assert (await create(first))["status"] == "synced"
            assert (await create(duplicate))["error"] == "DuplicateEmail"
            # (b) A CHECK constraint, refused.
            assert (await create(checked))["error"] == "AppDBRejected"
            # (c) SpiceDB refuses the write (no `admin` relation): the sync parks; fixed, resumed.
            await write_schema(own_stores.spicedb, _NO_ADMIN)
            assert (await create(refused, "start"))["status"] == "started"
            handle = client.get_workflow_handle(user_workflow_id(refused.user_id))

            async def parked() -> bool:
                return (await handle.describe()).typed_search_attributes.get(STAGE) == "parked"

            await eventually(parked, timeout=60)
            await write_schema(own_stores.spicedb)
            await handle.execute_update(UserSyncWorkflow.resume, ResumeInput())
            assert (await create(refused))["status"] == "synced"
            # (d) PostgreSQL unreachable while a creation retries, then back.
            await proxy.refuse()
            # A new user's run reads the App DB before it accepts an event: the call waits.
            waiting = asyncio.create_task(create(outage))
            await eventually(lambda: _retrying(client, outage.user_id), timeout=60)
            await proxy.restore()
            assert (await waiting)["status"] == "synced"

            page = await asyncio.to_thread(_scrape, f"http://{metrics}/metrics")
        finally:
            # SIGTERM: the worker drains, then flushes its last spans (SIGKILL if it hangs).
            await stop_process(worker, timeout=60)
    assert worker.returncode == 0
    assert "spicesync_time_to_permission" in page

    # The scan reads real spans: they name the users by their opaque ids.
    text = worker_traces.read_text()
    assert all(user_workflow_id(u.user_id) in text for u in users)
    assert _spans(app_traces)
    leaks = find_leaks(
        {
            "worker spans": text,
            "app spans": app_traces.read_text(),
            "worker log": worker_log.read_text(errors="replace"),
            "command output": "\n".join(printed),
            "metrics page": page,
        },
        users,
    )
    assert leaks == []
    # What a failed span says instead of the driver's message: the class and the code.
    descriptions = {s["status"].get("description") for s in _spans(worker_traces)}
    assert "UniqueViolationError (SQLSTATE 23505)" in descriptions
    assert "CheckViolationError (SQLSTATE 23514)" in descriptions
    assert "gRPC FAILED_PRECONDITION" in descriptions
    assert any(d and d.startswith("AppDBUnavailable") for d in descriptions), descriptions


async def _retrying(client: Client, user_id: str) -> bool:
    try:
        return await retrying(client, user_workflow_id(user_id))
    except RPCError:
        return False  # not started yet


async def _polling(client: Client, task_queue: str) -> bool:
    return await workers_polling(client, task_queue) > 0
