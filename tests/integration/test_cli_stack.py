"""The command line on its own stack: `stack up|status|down`, `worker`, `users create`."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from spicesync.settings import read_env_file
from spicesync.stack.processes import free_port, pid_alive
from tests.integration.test_outbox_relay import _APP_TABLE, _MAPPING

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "spicesync"]


def run(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def parse_env(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )


def stack_settings(env: dict[str, str]) -> dict[str, str]:
    """Every setting of the running stack, secrets included, as a script would fetch them."""
    shown = run(["stack", "env", "--show-secrets"], env)
    assert shown.returncode == 0, shown.stderr
    return parse_env(shown.stdout)


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Settings for a stack in a temporary state dir, on free ports, torn down afterwards."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_URL", "SPICESYNC_"))
    }
    env |= {
        "SPICESYNC_STATE_DIR": str(tmp_path / "state"),
        "SPICESYNC_TEMPORAL_PORT": str(free_port()),
        "SPICESYNC_TEMPORAL_UI_PORT": str(free_port()),
        "SPICESYNC_SPICEDB_PORT": str(free_port()),
        "SPICESYNC_CODEC_PORT": str(free_port()),
        "SPICESYNC_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "SPICESYNC_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
        "SPICESYNC_TASK_QUEUE": f"cli-{tmp_path.name}",
    }
    yield env
    run(["stack", "down"], env)


# Many CLI runs, each starting an interpreter: minutes on a busy 2-core box.
@pytest.mark.timeout(600)
def test_stack_worker_and_users_create(stack_env: dict[str, str]) -> None:
    up = run(["stack", "up"], stack_env)
    assert up.returncode == 0, up.stderr
    settings = read_env_file(Path(stack_env["SPICESYNC_STATE_DIR"]) / "stack.env")
    for key in (
        "SPICESYNC_ENCRYPTION_KEYS",
        "TEMPORAL_ADDRESS",
        "TEMPORAL_NAMESPACE",
        "DATABASE_URL",
        "SPICEDB_ENDPOINT",
        "SPICEDB_PRESHARED_KEY",
        "SPICESYNC_CODEC_TOKEN",
    ):
        assert settings.get(key), key
    assert settings["TEMPORAL_ADDRESS"].endswith(stack_env["SPICESYNC_TEMPORAL_PORT"])

    again = run(["stack", "up"], stack_env)  # idempotent: reuses what runs (and its secrets)
    assert again.returncode == 0 and again.stdout == up.stdout
    assert read_env_file(Path(stack_env["SPICESYNC_STATE_DIR"]) / "stack.env") == settings

    status = run(["stack", "status"], stack_env)
    assert status.returncode == 0, status.stdout
    health = [
        line
        for line in status.stdout.splitlines()
        if line.startswith("# ") and not line.startswith("# secrets not shown")
    ]
    assert len(health) == 4 and all(" healthy " in line and "log=" in line for line in health)
    pids = [int(word[4:]) for line in health for word in line.split() if word.startswith("pid=")]
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)

    assert_relays_listed(stack_env)

    worker = subprocess.Popen(
        [*CLI, "worker"], env=stack_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        created = run(
            [
                "users",
                "create",
                "--email",
                "cli@example.com",
                "--name",
                "Cli",
                "--org",
                "cli-org",
                "--role",
                "admin",
            ],
            stack_env,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        outcome = json.loads(created.stdout)
        assert outcome["status"] == "synced" and outcome["zed_token"]
        assert outcome["workflow_id"] == f"user-{outcome['user_id']}"

        rejected = run(
            ["users", "create", "--email", "nope", "--name", "X", "--org", "o"], stack_env
        )
        assert rejected.returncode == 2
        assert json.loads(rejected.stdout)["error"] == "InvalidUserInput"

        duplicate = run(
            [
                "users",
                "create",
                "--email",
                "CLI@example.com",
                "--name",
                "Other",
                "--org",
                "cli-org",
                "--wait",
                "row",
            ],
            stack_env,
        )
        assert duplicate.returncode == 1
        assert json.loads(duplicate.stdout)["error"] == "DuplicateEmail"
        uid = outcome["user_id"]
        metrics_url = f"http://{stack_env['SPICESYNC_METRICS_ADDRESS']}/metrics"
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            assert b"spicesync_time_to_permission" in response.read()
        # The worker on the local stack is ready: Temporal, PostgreSQL and SpiceDB all answer.
        ready_url = f"http://{stack_env['SPICESYNC_HEALTH_ADDRESS']}/readyz"
        with urllib.request.urlopen(ready_url, timeout=10) as response:
            assert json.loads(response.read())["status"] == "ready"
        repaired = json.loads(run(["repair", "resume", "--user-id", uid], stack_env).stdout)
        assert repaired == {"user_id": uid, "action": "resume", "resumed": False}
        for args, version in (
            (["update", "--user-id", uid, "--org", "cli-org", "--role", "member"], 2),
            (["move", "--user-id", uid, "--org", "cli-org-2", "--role", "member"], 3),
            (["delete", "--user-id", uid], 4),
        ):
            changed = run(["users", *args, "--version", str(version)], stack_env)
            assert changed.returncode == 0, changed.stdout + changed.stderr
            result = json.loads(changed.stdout)
            assert (result["status"], result["version"]) == ("synced", version)
        old = ["--org", "x", "--role", "admin", "--version", "3", "--event-id", "old"]
        stale = run(["users", "update", "--user-id", uid, *old], stack_env)
        assert json.loads(stale.stdout)["status"] == "stale"
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output  # graceful shutdown on SIGTERM
    assert "worker stopped" in output
    # Structured logs: JSON lines with ids, and no email anywhere (the refused duplicate's too).
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(r["message"] == "worker stopped" for r in records)
    assert "cli@example.com" not in output.lower()
    traces = Path(stack_env["SPICESYNC_STATE_DIR"]) / "logs" / "traces.jsonl"
    span_names = {json.loads(line)["name"] for line in traces.read_text().splitlines()}
    assert {"RunActivity:write_memberships", "RunWorkflow:UserSyncWorkflow"} <= span_names

    stuck = run(["stuck", "--older-than", "1m"], stack_env)
    assert stuck.returncode == 0 and "no sync has been stuck" in stuck.stdout
    assert json.loads(run(["stuck", "--json"], stack_env).stdout) == []

    down = run(["stack", "down"], stack_env)
    assert down.returncode == 0 and "temporal" in down.stdout and "spicedb" in down.stdout
    assert not any(pid_alive(p) for p in pids)
    assert not (Path(stack_env["SPICESYNC_STATE_DIR"]) / "stack.env").exists()


def relay_lines(env: dict[str, str]) -> list[str]:
    status = run(["stack", "status"], env)
    return [line for line in status.stdout.splitlines() if line.startswith("# relay ")]


def wait_for_relay_lines(env: dict[str, str], wanted: int, healthy: bool) -> list[str]:
    deadline = time.monotonic() + 120
    while True:
        lines = relay_lines(env)
        if len(lines) == wanted and all((" healthy " in line) == healthy for line in lines):
            return lines
        assert time.monotonic() < deadline, lines
        time.sleep(0.5)


async def create_app_table(database_url: str) -> None:
    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        await conn.execute(_APP_TABLE)
    finally:
        await conn.close()


def assert_relays_listed(stack_env: dict[str, str]) -> None:
    """Relays started beside the stack are listed, probed, and forgotten once gone.

    The CDC relay also proves the stack's PostgreSQL runs with ``wal_level = logical``.
    """
    assert relay_lines(stack_env) == []
    state = Path(stack_env["SPICESYNC_STATE_DIR"])
    database_url = read_env_file(state / "stack.env")["DATABASE_URL"]
    asyncio.run(create_app_table(database_url))
    (state / "spicesync.toml").write_text(_MAPPING)
    relays = []
    for feed in ("outbox", "cdc"):
        env = stack_env | {
            f"SPICESYNC_{feed.upper()}_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
            f"SPICESYNC_{feed.upper()}_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
            "SPICESYNC_CONFIG": str(state / "spicesync.toml"),
        }
        relays.append(
            subprocess.Popen(
                [*CLI, "relay", feed],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        lines = wait_for_relay_lines(stack_env, 2, healthy=True)
        assert {f"pid={r.pid}" for r in relays} == {
            word for line in lines for word in line.split() if word.startswith("pid=")
        }
        assert {line.split()[3] for line in lines} == {"outbox", "cdc"}
        for line in lines:
            assert "health=" in line and "metrics=" in line, line
        relays[0].send_signal(signal.SIGTERM)  # a relay that stops takes its line with it
        relays[0].communicate(timeout=60)
        relays[1].kill()  # one killed outright is pruned by the next status
        relays[1].communicate(timeout=60)
        assert relay_lines(stack_env) == []
        assert list((Path(stack_env["SPICESYNC_STATE_DIR"]) / "relays").iterdir()) == []
    finally:
        for relay in relays:
            if relay.poll() is None:
                relay.kill()
                relay.communicate(timeout=60)


SECRETS = ("SPICEDB_PRESHARED_KEY", "SPICESYNC_ENCRYPTION_KEYS", "SPICESYNC_CODEC_TOKEN")


def test_stack_keeps_its_secrets_private(stack_env: dict[str, str]) -> None:
    up = run(["stack", "up"], stack_env)
    assert up.returncode == 0, up.stderr
    state = Path(stack_env["SPICESYNC_STATE_DIR"])
    settings = read_env_file(state / "stack.env")
    secrets = [value for key, value in settings.items() if key in SECRETS]
    secrets.append(settings["SPICESYNC_ENCRYPTION_KEYS"].split(":", 1)[1])  # the bare key
    assert all(len(s) >= 32 for s in secrets)
    status = run(["stack", "status"], stack_env)
    shown = run(["stack", "env"], stack_env)
    for output in (up.stdout, up.stderr, status.stdout, status.stderr, shown.stdout):
        assert not [s for s in secrets if s in output], output
    for output in (up.stdout, status.stdout, shown.stdout):  # and they say where they are
        assert "# secrets not shown" in output and "--show-secrets" in output
    assert parse_env(shown.stdout)["TEMPORAL_ADDRESS"] == settings["TEMPORAL_ADDRESS"]
    assert stack_settings(stack_env) == settings  # asked for: every secret, for scripts
    assert len(secrets) == len(SECRETS) + 1  # the codec token is one of them

    state_mode = state.stat().st_mode & 0o777
    # 0700; as root, 0710 for the group the embedded PostgreSQL runs with (it lives inside).
    assert state_mode == 0o700 or (os.geteuid() == 0 and state_mode == 0o710), oct(state_mode)
    for name in ("stack.env", "encryption-keys", "stack.json"):
        assert (state / name).stat().st_mode & 0o777 == 0o600, name
    record = (state / "stack.json").read_text()
    assert not [s for s in secrets if s in record]
    # PostgreSQL still reaches its data through the narrowed folder: a checkpoint opens its files
    # by absolute path (and PANICs when it cannot), then the stack is still healthy.
    checkpoint = subprocess.run(
        [sys.executable, "-c", _CHECKPOINT, settings["DATABASE_URL"]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checkpoint.returncode == 0, checkpoint.stderr
    # The codec server got its token through the environment, not its command line.
    codec_pid = next(
        int(word[4:])
        for line in status.stdout.splitlines()
        if line.startswith("# codec")
        for word in line.split()
        if word.startswith("pid=")
    )
    command_line = Path(f"/proc/{codec_pid}/cmdline").read_bytes().decode(errors="replace")
    assert not [s for s in secrets if s in command_line]
    again = run(["stack", "status"], stack_env)
    assert again.returncode == 0, again.stdout


def test_configuration_errors_are_one_line_naming_the_setting(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_URL", "SPICESYNC_"))
    } | {"SPICESYNC_STATE_DIR": str(tmp_path / "no-stack"), "TEMPORAL_ADDRESS": "127.0.0.1:1"}
    key = base64.b64encode(bytes(range(65, 97))).decode()  # 32 bytes: a well-formed AES key
    keys = f"k1:{key}"
    preshared = "p" * 40
    cases: list[tuple[list[str], dict[str, str], str]] = [
        # A key that is not base64, one too short: the worker used to die with a traceback.
        (
            ["worker"],
            {"SPICESYNC_ENCRYPTION_KEYS": f"k1:{key[:30]}!!"},
            "SPICESYNC_ENCRYPTION_KEYS",
        ),
        (["worker"], {"SPICESYNC_ENCRYPTION_KEYS": f"k1:{key[:24]}"}, "SPICESYNC_ENCRYPTION_KEYS"),
        (["stuck"], {"DATABASE_POOL_MIN": "many"}, "DATABASE_POOL_MIN"),
        # The codec server decrypts for nobody unauthenticated: no token, or a guessable one.
        (
            ["codec-server", "--port", "0"],
            {"SPICESYNC_ENCRYPTION_KEYS": keys},
            "SPICESYNC_CODEC_TOKEN",
        ),
        (
            ["codec-server", "--port", "0"],
            {"SPICESYNC_ENCRYPTION_KEYS": keys, "SPICESYNC_CODEC_TOKEN": "short"},
            "SPICESYNC_CODEC_TOKEN",
        ),
        # Production with the keys set but a service missing: the error names it, not the keys.
        (
            ["worker"],
            {
                "SPICESYNC_ENV": "production",
                "SPICESYNC_ENCRYPTION_KEYS": keys,
                "SPICEDB_PRESHARED_KEY": preshared,
            },
            "DATABASE_URL",
        ),
    ]
    for command, extra, setting in cases:
        done = run(command, env | extra, timeout=60)
        assert done.returncode == 2, (command, extra, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and setting in lines[0], (command, extra, done.stderr)
        assert "Traceback" not in done.stderr
        for secret in (key, preshared):  # not even a part of one
            assert secret[:16] not in done.stderr and secret[-16:] not in done.stderr


def test_duplicate_after_a_worker_crash_is_a_no_op(stack_env: dict[str, str]) -> None:
    up = run(["stack", "up"], stack_env)
    assert up.returncode == 0, up.stderr
    user_id = str(uuid.uuid4())
    create = ["users", "create", "--email", f"crash-{user_id[-6:]}@example.com", "--name", "C"]
    create += ["--org", "crash-org", "--user-id", user_id]

    first = subprocess.Popen(
        [*CLI, "worker"], env=stack_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        accepted = run([*create, "--wait", "start"], stack_env)
        assert json.loads(accepted.stdout)["status"] == "started"
    finally:
        first.kill()  # SIGKILL: no draining, whatever it was doing is cut off
        first.wait()
    second = subprocess.Popen(
        [*CLI, "worker"], env=stack_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        again = run(create, stack_env)  # the same event, delivered again, waits for its outcome
        outcome = json.loads(again.stdout)
        assert again.returncode == 0 and outcome["status"] == "synced"
        status = run(["users", "create", *create[2:], "--wait", "permissions"], stack_env)
        assert json.loads(status.stdout)["zed_token"] == outcome["zed_token"]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    env = parse_env(up.stdout)
    rows = subprocess.run(
        [sys.executable, "-c", _COUNT, env["DATABASE_URL"], user_id],
        capture_output=True,
        text=True,
        check=True,
    )
    assert rows.stdout.split() == ["1", "synced"]


_CHECKPOINT = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.execute("CHECKPOINT")
    await conn.close()
asyncio.run(main())
"""

_COUNT = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    n = await conn.fetchval("SELECT count(*) FROM users WHERE id = $1::uuid", sys.argv[2])
    s = await conn.fetchval("SELECT sync_status FROM users WHERE id = $1::uuid", sys.argv[2])
    print(n, s)
    await conn.close()
asyncio.run(main())
"""
