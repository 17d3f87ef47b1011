"""``spicesync bench --quick``: every system produces figures and nothing is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_cli_stack import run, stack_env  # noqa: F401 - stack_env is a fixture

pytestmark = pytest.mark.integration


@pytest.mark.timeout(400)
def test_quick_bench_measures_every_system_and_loses_nothing(
    stack_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench"
    done = run(["bench", "--quick", "--out", str(out)], stack_env, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((out / "bench.json").read_text())
    systems = {c["system"] for c in payload["cells"]}
    assert systems == {
        "empty workflow (ceiling)",
        "spicesync",
        "dual write (no durability)",
        "event-driven (NATS JetStream)",
        "outbox + polling relay",
    }
    for cell in payload["cells"]:
        assert cell["completed"] == cell["submitted"] > 0, cell
        assert cell["lost"] == 0 and cell["not_done"] == 0, cell
        assert cell["time_to_permission_ms"]["p99"] is not None, cell
    backfill = payload["backfill"]
    assert backfill["spicesync_written_users"] == backfill["users"] == 2000
    assert backfill["sample_holding"] == backfill["sample_checked"]
    assert (out / "bench.png").stat().st_size > 10_000
    assert "| spicesync |" in (out / "bench.md").read_text()
