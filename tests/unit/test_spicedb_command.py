"""A ``spicedb`` binary on PATH is started listening on 127.0.0.1 only (issue 14).

``spicedb serve`` also serves metrics on every interface (``:9090``) and reports telemetry to
authzed.com unless told otherwise; the local stack wants its gRPC port on loopback and nothing
else. No SpiceDB binary exists on this project's machines, so a stand-in on PATH shows which
command the stack would run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spicesync.stack.components import spicedb_command


def test_a_spicedb_binary_serves_grpc_on_loopback_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = tmp_path / "spicedb"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    cmd, _env, label = spicedb_command(50999)
    assert cmd[:2] == [str(binary), "serve"] and "spicedb binary" in label
    assert cmd[cmd.index("--grpc-addr") + 1] == "127.0.0.1:50999"
    for off in ("--http-enabled=false", "--metrics-enabled=false", "--telemetry-endpoint="):
        assert off in cmd
