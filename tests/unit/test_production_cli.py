"""The command line refuses an unsafe production configuration: exit 2, one line naming it.

Nothing is reached: each refusal happens before a connection is opened (the addresses below
do not exist).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spicesync.codec import generate_key

CLI = [sys.executable, "-m", "spicesync"]
KEY = "k" * 40


def production_env(state: Path, **changes: str) -> dict[str, str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_", "SPICESYNC_", "PGSSL"))
    }
    return clean | {
        "SPICESYNC_ENV": "production",
        "SPICESYNC_STATE_DIR": str(state),
        "DATABASE_URL": "postgresql://spicesync@db.invalid:5432/app?sslmode=verify-full",
        "SPICEDB_ENDPOINT": "spicedb.invalid:50051",
        "SPICEDB_PRESHARED_KEY": KEY,
        "SPICESYNC_ENCRYPTION_KEYS": f"k1:{generate_key()}",
        "SPICESYNC_METRICS_ADDRESS": "",
        **changes,
    }


CASES = [
    (["migrate"], {"SPICEDB_INSECURE": "true"}, "SPICEDB_INSECURE"),
    (["worker"], {"SPICEDB_INSECURE": "true"}, "SPICEDB_INSECURE"),
    (["migrate"], {"DATABASE_URL": "postgresql://spicesync@db.invalid/app"}, "DATABASE_URL"),
    (["worker"], {"SPICEDB_PRESHARED_KEY": "short"}, "SPICEDB_PRESHARED_KEY"),
    (
        ["migrate"],
        {"SPICESYNC_ENCRYPTION_KEYS": "k1:c2hvcnQta2V5LTE2Ynl0ZQ=="},
        "SPICESYNC_ENCRYPTION_KEYS",
    ),
    # Refused before any connection is tried: the line says what to set, not "cannot reach".
    (["setup-namespace"], {"TEMPORAL_ADDRESS": "temporal.invalid:7233"}, "TEMPORAL_TLS=true"),
    (["worker"], {"TEMPORAL_ADDRESS": "temporal.invalid:7233"}, "TEMPORAL_TLS=true"),
    (
        ["migrate"],
        {"SPICEDB_INSECURE": "true", "SPICESYNC_ALLOW_PLAINTEXT_IN_PRODUCTION": "yes"},
        "SPICESYNC_ALLOW_PLAINTEXT_IN_PRODUCTION",
    ),
    # The codec server on the network without TLS would carry tokens and decrypted payloads.
    (
        ["codec-server", "--host", "0.0.0.0", "--port", "0"],
        {"SPICESYNC_CODEC_TOKEN": "c" * 40},
        "SPICESYNC_CODEC_TLS_CERT",
    ),
]


@pytest.mark.parametrize(
    ("command", "changes", "name"), CASES, ids=[f"{c[0][0]}-{c[2]}" for c in CASES]
)
def test_unsafe_production_setting_is_one_line_naming_it(
    command: list[str], changes: dict[str, str], name: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [*CLI, *command],
        env=production_env(tmp_path / "state", **changes),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], done.stderr
    assert KEY not in done.stderr


@pytest.mark.parametrize("command", [["migrate"], ["worker"]])
def test_production_refuses_a_local_stacks_settings_file(
    command: list[str], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "stack.env").write_text("SPICEDB_ENDPOINT=127.0.0.1:50051\n")
    done = subprocess.run(
        [*CLI, *command],
        env=production_env(state),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "stack.env" in lines[0], done.stderr
