"""What a user of the command line sees: output shapes, progress, logs, the README's example.

Each test runs the real commands as processes against a local stack of this module's own (free
ports, its own state dir), each on a task queue of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import asyncpg
import pytest
from temporalio.client import Client

from chaos.faults import FAULTS_DDL
from spicesync.spicedb import connect_spicedb, user_memberships
from spicesync.stack.processes import free_port
from tests.integration.conftest import revoke_all
from tests.integration.test_cli_stack import (  # noqa: F401 - stack_env is a fixture
    CLI,
    parse_env,
    run,
    stack_env,
    stack_settings,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "create_user.py"
ANSI = "\x1b["
USERS_KEYS = ["user_id", "workflow_id", "event_id", "version", "status", "zed_token", "error"]


@dataclass
class Stack:
    """The module's stack: the CLI's environment and the settings ``stack up`` printed."""

    env: dict[str, str]
    settings: dict[str, str]

    def on_queue(self, tmp_path: Path, **extra: str) -> dict[str, str]:
        """The environment with a task queue of the test's own."""
        return self.env | {"SPICESYNC_TASK_QUEUE": f"ux-{tmp_path.name}"} | extra


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("ux-stack")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_URL", "SPICESYNC_"))
    } | {
        "SPICESYNC_STATE_DIR": str(state / "state"),
        "SPICESYNC_TEMPORAL_PORT": str(free_port()),
        "SPICESYNC_TEMPORAL_UI_PORT": str(free_port()),
        "SPICESYNC_SPICEDB_PORT": str(free_port()),
        "SPICESYNC_CODEC_PORT": str(free_port()),
        "SPICESYNC_METRICS_ADDRESS": "",
        "SPICESYNC_HEALTH_ADDRESS": "",
        "SPICESYNC_TASK_QUEUE": "ux-stack",
    }
    up = run(["stack", "up"], env)
    assert up.returncode == 0, up.stderr
    try:
        yield Stack(env, stack_settings(env))
    finally:
        run(["stack", "down"], env)


@dataclass
class Worker:
    """A ``spicesync worker`` process; everything it prints goes to ``log``."""

    process: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def start_worker(env: dict[str, str], log: Path) -> Worker:
    out: IO[bytes] = log.open("wb")
    process = subprocess.Popen([*CLI, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    worker = Worker(process, log)
    deadline = time.monotonic() + 60
    while not any("worker polling" in line for line in worker.lines()):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return worker


def wait_for_line(stream: IO[str], needle: str, timeout: float) -> str:
    """Read ``stream`` until a line containing ``needle`` (fails after ``timeout`` seconds)."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        if selector.select(timeout=max(0.0, deadline - time.monotonic())):
            line = stream.readline()
            seen.append(line)
            if needle in line:
                return line
            if not line:
                break
    raise AssertionError(f"no line with {needle!r} within {timeout} s; saw {seen}")


def test_users_prints_one_shape_and_says_what_it_waits_for(stack: Stack, tmp_path: Path) -> None:
    env = stack.on_queue(tmp_path)
    user_id = str(uuid.uuid4())
    email = f"ux-{user_id[:8]}@example.com"
    create = ["users", "create", "--email", email, "--name", "Ux", "--org", "ux-org"]
    # No worker polls this queue yet: the command waits, and says so on stderr while it does.
    waiting = subprocess.Popen(
        [*CLI, *create, "--user-id", user_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = None
    try:
        assert waiting.stderr is not None
        line = wait_for_line(waiting.stderr, "waiting for", timeout=60)
        assert "spicesync worker" in line and len(line) < 200
        worker = start_worker(env, tmp_path / "worker.log")
        out, _ = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, out
        synced = json.loads(out)
        failed = run([*create[:3], email.upper(), *create[4:], "--wait", "row"], env)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        rejected = run([*create[:7], "not an org"], env)
        assert rejected.returncode == 2, rejected.stdout + rejected.stderr
    finally:
        waiting.kill()
        if worker is not None:
            worker.stop()
    outcomes = [synced, json.loads(failed.stdout), json.loads(rejected.stdout)]
    assert [o["status"] for o in outcomes] == ["synced", "failed", "rejected"]
    assert [o["error"] for o in outcomes] == [None, "DuplicateEmail", "InvalidUserInput"]
    # One shape: the same keys in the same order, whatever became of the event.
    assert [list(o)[: len(USERS_KEYS)] for o in outcomes] == [USERS_KEYS] * 3
    assert len({tuple(o) for o in outcomes}) == 1
    assert synced["user_id"] == user_id and synced["event_id"] and synced["zed_token"]
    assert outcomes[1]["user_id"] and outcomes[1]["event_id"]
    assert outcomes[2]["user_id"]
    assert email not in failed.stdout.lower() + rejected.stdout.lower()


async def test_the_readme_example_runs_against_the_stack(stack: Stack, tmp_path: Path) -> None:
    env = stack.on_queue(tmp_path)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        example = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(example.communicate(), timeout=180)
    finally:
        worker.stop()
    assert example.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [line.get("status") for line in lines] == ["pending", "synced", None, "synced", "synced"]
    assert [line.get("version") for line in lines] == [1, 2, None, 3, 4]
    assert lines[2] == {"manage_acme_after_role_change": True}
    user_id = lines[0]["user_id"]
    # Deleted at the end: gone from both stores.
    conn = await asyncpg.connect(stack.settings["DATABASE_URL"])
    try:
        row = await conn.fetchrow("SELECT 1 FROM users WHERE id = $1", uuid.UUID(user_id))
    finally:
        await conn.close()
    assert row is None
    spicedb = connect_spicedb(
        stack.settings["SPICEDB_ENDPOINT"], stack.settings["SPICEDB_PRESHARED_KEY"]
    )
    try:
        assert await user_memberships(spicedb, user_id) == []
    finally:
        await spicedb.close()


async def _retrying(client: Client, workflow_id: str) -> bool:
    described = await client.get_workflow_handle(workflow_id).describe()
    return any(p.attempt >= 2 for p in described.raw_description.pending_activities)


async def test_worker_log_is_json_lines_and_a_stop_mid_repair_is_quiet(
    stack: Stack, tmp_path: Path
) -> None:
    """Every line a worker prints is a JSON object, the SDK core's own warnings included.

    The core warns about every workflow task slower than the threshold: at 0 s, every task. And
    SIGTERM while a reconcile repair waits on a user's workflow (held by an injected PostgreSQL
    fault) cancels that activity quietly once the shutdown grace is over; a second worker
    finishes the repair. The grace is 5 s here, below the repair's 20 s heartbeat timeout: with
    a longer one the server times the blocked activity out first (the core then warns that the
    late cancellation found no activity).
    """
    env = stack.on_queue(
        tmp_path,
        TEMPORAL_WORKFLOW_TASK_DURATION_WARN_SECONDS="0",
        SPICESYNC_SHUTDOWN_GRACE_SECONDS="5",
    )
    first = start_worker(env, tmp_path / "first.log")
    second = None
    reconcile = None
    conn = await asyncpg.connect(stack.settings["DATABASE_URL"])
    spicedb = connect_spicedb(
        stack.settings["SPICEDB_ENDPOINT"], stack.settings["SPICEDB_PRESHARED_KEY"]
    )
    client = await Client.connect(stack.settings["TEMPORAL_ADDRESS"])
    user_id = str(uuid.uuid4())
    try:
        email = f"log-{user_id[:8]}@example.com"
        create = ["users", "create", "--email", email, "--name", "L", "--org", "log-org"]
        created = run([*create, "--user-id", user_id], env)
        assert created.returncode == 0, created.stdout + created.stderr
        # Drift for the reconcile to repair: the membership gone from SpiceDB behind its back.
        await revoke_all(spicedb, user_id)
        # Recording the repair on the row fails transiently (serialization failure) until the
        # fault is cleared, so the repair's update, and the activity waiting on it, stay open.
        await conn.execute(FAULTS_DDL)
        await conn.execute(
            "INSERT INTO injected_faults VALUES ($1, 'UPDATE', '40001')", uuid.UUID(user_id)
        )
        reconcile = await asyncio.create_subprocess_exec(
            *CLI,
            "reconcile",
            "--apply",
            "--json",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while not await _retrying(client, f"user-{user_id}"):
            assert time.monotonic() < deadline, "the repair never reached the user's workflow"
            await asyncio.sleep(0.5)
        assert await asyncio.to_thread(first.stop) == 0
        lines = [line for line in first.lines() if line.strip()]

        await conn.execute("DELETE FROM injected_faults WHERE user_id = $1", uuid.UUID(user_id))
        second = start_worker(stack.on_queue(tmp_path), tmp_path / "second.log")
        out, _ = await asyncio.wait_for(reconcile.communicate(), timeout=120)
        assert reconcile.returncode == 0
        report = json.loads(out)
        assert await user_memberships(spicedb, user_id) == [("log-org", "member")]
    finally:
        if reconcile is not None and reconcile.returncode is None:
            reconcile.kill()
        if first.process.poll() is None:
            first.process.kill()
        if second is not None:
            await asyncio.to_thread(second.stop)
        await conn.execute("DELETE FROM injected_faults WHERE user_id = $1", uuid.UUID(user_id))
        await conn.close()
        await spicedb.close()

    assert not [line for line in lines if ANSI in line]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) and r.get("message") is not None for r in records)
    core = [r for r in records if r["logger"] == "temporalio.sdk_core"]
    assert core and all("TMPRL1104" in r["message"] and r["target"] for r in core)
    # The stop cancelled the repair quietly: no CancelledError traceback, no "Future exception
    # was never retrieved"; the only warnings are the injected fault's retried attempts.
    assert not [r for r in records if "CancelledError" in json.dumps(r)]
    loud = [r for r in records if r["level"] != "INFO" and r["logger"] != "temporalio.sdk_core"]
    assert {r.get("activity_type") for r in loud} <= {"record_repair"}, loud
    assert records[-1]["message"] == "worker stopped"
    # Found once; repaired by the first worker's write or by the second, never failed.
    repairs = report["repairs"]
    assert report["found"]["missing"] == 1 and repairs["failed"] == 0, report
    assert repairs["repaired"] + repairs["consistent"] == 1, report


def test_demo_says_what_it_is_doing(
    stack_env: dict[str, str],  # noqa: F811
) -> None:
    done = run(["demo", "--users", "5"], stack_env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    progress = done.stderr.splitlines()
    for step in (
        "demo: bringing the local stack up",
        "demo: creating 10 users (5 valid, 5 malformed)",
        "demo: 10/10 users answered",
        "demo: checking every user",
        "demo: reconciling both stores",
    ):
        assert any(line.startswith(step) for line in progress), (step, progress)
    assert ANSI not in done.stdout + done.stderr
    assert "result                   : OK" in done.stdout


def test_follow_demo_then_owned_demo_share_one_stack(
    stack_env: dict[str, str],  # noqa: F811
) -> None:
    # The follow demo's application writes its own table with plain SQL and the outbox; its
    # summary is the demo's own independent check of SpiceDB (exit 0 only if it held).
    done = run(["demo", "--follow", "--users", "20"], stack_env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in (
        "SpiceDB follows the table: 16 live accounts hold exactly what their row implies,"
        " 3 deleted accounts hold nothing",
        "workspace#owner of a deleted account kept",
        "unmappable row           : recorded as failed",
        "result                   : OK",
    ):
        assert line in done.stdout, done.stdout
    # A later `stack up` (the owned demo's) leaves the application's wider schema alone: the
    # follow demo runs again on the same SpiceDB, whose team relationships would otherwise
    # refuse the schema write.
    owned = run(["demo", "--users", "3"], stack_env, timeout=300)
    assert owned.returncode == 0, owned.stdout + owned.stderr
    again = run(["demo", "--follow", "--users", "20"], stack_env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
