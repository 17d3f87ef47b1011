"""Every bad argument of every command: one line naming it, exit status 2, no traceback.

Nothing here needs a running engine: bad arguments are refused before anything connects (the
environment points Temporal at a closed port, so a command that did connect would fail loudly).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from spicesync.codec import generate_key
from spicesync.stack.processes import free_port

CLI = [sys.executable, "-m", "spicesync"]
USER = str(uuid.uuid4())
CHANGE = ["--user-id", USER, "--org", "acme", "--role", "admin"]
CREATE = ["--email", "a@example.com", "--name", "A", "--org", "acme"]

# (arguments, the argument the one line must name)
BAD = [
    (["stuck", "--older-than", "banana"], "--older-than"),
    (["stuck", "--older-than", "-5m"], "--older-than"),
    (["reconcile", "--page-size", "5000"], "--page-size"),
    (["reconcile", "--page-size", "0"], "--page-size"),
    (["reconcile", "--page-size", "many"], "--page-size"),
    (["reconcile", "--prune-cap", "-1"], "--prune-cap"),
    (["reconcile", "--schedule-every", "0.5"], "--schedule-every"),
    (["reconcile", "--schedule-every", "1e30"], "--schedule-every"),
    (["reconcile", "--schedule-every", "nan"], "--schedule-every"),
    (["reconcile", "--dry-run", "--apply"], "--apply"),
    (["backfill", "--batch-size", "10000"], "--batch-size"),
    (["backfill", "--batch-size", "0"], "--batch-size"),
    (["backfill", "--max-rate", "-1"], "--max-rate"),
    (["backfill", "--max-rate", "inf"], "--max-rate"),
    (["backfill", "--lanes", "0"], "--lanes"),
    (["backfill", "--lanes", "17"], "--lanes"),
    (["bench", "--rates", "0"], "--rates"),
    (["bench", "--rates", "10", "fast"], "--rates"),
    (["bench", "--seconds", "-3"], "--seconds"),
    (["bench", "--backfill-users", "0"], "--backfill-users"),
    (["bench", "--systems", "nope"], "--systems"),
    (["bench", "--nats-url", "localhost:4222"], "--nats-url"),
    (["bench", "--out", "/dev/null/bench"], "--out"),
    (["chaos", "--users", "0"], "--users"),
    (["chaos", "--scenario", "nope"], "--scenario"),
    (["chaos", "--outage-seconds", "0"], "--outage-seconds"),
    (["chaos", "--out", "/dev/null/chaos"], "--out"),
    (["demo", "--users", "0"], "--users"),
    (["demo", "--users", "lots"], "--users"),
    (["repair", "retry", "--user-id", "not-a-uuid"], "--user-id"),
    (["repair", "undo", "--user-id", USER], "action"),
    (["codec-server", "--port", "70000"], "--port"),
    (["codec-server", "--ui-origin", "localhost:8233"], "--ui-origin"),
    (["codec-server", "--ui-origin", "http://localhost:8233/path"], "--ui-origin"),
    (["codec-server", "--host", "no-such-host.invalid", "--port", "0"], "--host"),
    (["users", "create", *CREATE, "--version", "two"], "--version"),
    (["users", "create", *CREATE, "--wait", "soon"], "--wait"),
    (["users", "create", *CREATE, "--role", "owner"], "--role"),
    (["users", "create", "--name", "A", "--org", "acme"], "--email"),
    (["users", "update", *CHANGE], "--version"),
    (["users", "delete", "--user-id", USER, "--version", "0"], "--version"),
    (["stack", "sideways"], "action"),
    (["worker", "--bogus"], "--bogus"),
    ([], "COMMAND"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """No stack: an empty state dir, Temporal on a closed port, what the codec server needs.

    The stack's ports are free ones too: a regression that got as far as `stack up` must not
    collide with a stack on the default ports.
    """
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_URL", "SPICESYNC_"))
    }
    state = tmp_path_factory.mktemp("state")
    return clean | {
        "SPICESYNC_STATE_DIR": str(state),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "SPICESYNC_ENCRYPTION_KEYS": f"k1:{generate_key()}",
        "SPICESYNC_CODEC_TOKEN": "argument-tests-" + "t" * 32,
        "SPICESYNC_METRICS_ADDRESS": "",
        "SPICESYNC_HEALTH_ADDRESS": "",
        "SPICESYNC_TEMPORAL_PORT": str(free_port()),
        "SPICESYNC_TEMPORAL_UI_PORT": str(free_port()),
        "SPICESYNC_SPICEDB_PORT": str(free_port()),
        "SPICESYNC_CODEC_PORT": str(free_port()),
    }


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("args", "name"), BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_argument_is_one_line_naming_it(
    args: list[str], name: str, env: dict[str, str], tmp_path: Path
) -> None:
    done = run(args, env, tmp_path)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert name in lines[0], lines[0]
    assert done.stdout == ""
    assert not (tmp_path / ".spicesync").exists()  # nothing was set up or written


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["users", "update", "--user-id", "nope", "--org", "acme", "--role", "admin"], "user_id"),
        (["users", "update", *CHANGE[:2], "--org", "acme corp", "--role", "admin"], "org_id"),
        (["users", "create", "--email", "not-an-email", "--name", "A", "--org", "acme"], "email"),
        (["users", "move", *CHANGE, "--event-id", "has spaces"], "event_id"),
    ],
)
def test_invalid_user_event_is_a_json_rejection(
    args: list[str], field: str, env: dict[str, str], tmp_path: Path
) -> None:
    """Event content is the starters' to judge: the same JSON line as every users outcome."""
    done = run([*args, "--version", "2"], env, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stdout.splitlines()
    outcome = json.loads(line)
    assert outcome["status"] == "rejected" and outcome["error"] == "InvalidUserInput"
    assert field in outcome["message"]
    assert {"user_id", "event_id", "workflow_id", "version", "zed_token"} <= outcome.keys()


@pytest.mark.parametrize(
    "args",
    [
        ["users", "create", *CREATE],
        ["users", "delete", "--user-id", USER, "--version", "2"],
        ["stuck"],
        ["repair", "resume", "--user-id", USER],
        ["reconcile", "--apply"],
        ["reconcile", "--schedule-every", "60"],
        ["backfill"],
    ],
    ids=" ".join,
)
def test_no_temporal_is_one_line_saying_so(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    done = run(args, env, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "cannot reach Temporal at " + env["TEMPORAL_ADDRESS"] in line
    assert done.stdout == ""


def test_a_worker_without_temporal_says_so_in_its_json_log(
    env: dict[str, str], tmp_path: Path
) -> None:
    done = run(
        ["worker"],
        env
        | {
            "DATABASE_URL": "postgresql:///x",
            "SPICEDB_ENDPOINT": "x:1",
            "SPICEDB_PRESHARED_KEY": "k",
        },
        tmp_path,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and "cannot reach Temporal" in record["message"]
