"""``spicesync bench --quick``: every system produces figures, nothing is lost, nothing is left."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from spicesync.stack.processes import pid_alive, stop_pid
from tests.integration.test_cli_stack import (  # noqa: F401 - stack_env is a fixture
    CLI,
    run,
    stack_env,
)

pytestmark = pytest.mark.integration


# Eight systems, each cell warmed up before its window, on a loaded 2-core box.
@pytest.mark.timeout(660)
def test_quick_bench_measures_every_system_and_loses_nothing(
    stack_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench"
    done = run(["bench", "--quick", "--out", str(out)], stack_env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((out / "bench.json").read_text())
    systems = {c["system"] for c in payload["cells"]}
    assert systems == {
        "empty workflow (ceiling)",
        "spicesync",
        "two-activity workflow (naive)",
        "dual write (no durability)",
        "event-driven (NATS JetStream)",
        "outbox + polling relay",
        "spicesync follow (outbox relay)",
        "spicesync follow (CDC relay)",
        "spicesync follow (NATS relay)",
    }
    for cell in payload["cells"]:
        assert cell["completed"] == cell["submitted"] > 0, cell
        assert cell["lost"] == cell["not_done"] == cell["late"] == 0, cell
        assert cell["time_to_permission_ms"]["p99"] is not None, cell
        _assert_cpu_accounted(cell)
    backfill = payload["backfill"]
    assert backfill["spicesync_written_users"] == backfill["users"] == 2000
    assert backfill["sample_holding"] == backfill["sample_checked"]
    assert (out / "bench.png").stat().st_size > 10_000
    table = (out / "bench.md").read_text()
    assert "| spicesync |" in table
    assert "| two-activity workflow (naive) | 10 |" in table
    assert "| system | offered/s | load generator | temporal | worker |" in table


# Which processes each system runs beyond the load generator and the stores (bench/run.py).
_TEMPORAL_BOUND = {
    "empty workflow (ceiling)",
    "spicesync",
    "two-activity workflow (naive)",
    "spicesync follow (outbox relay)",
    "spicesync follow (CDC relay)",
    "spicesync follow (NATS relay)",
}
_RELAYS = {
    "spicesync follow (outbox relay)",
    "spicesync follow (CDC relay)",
    "spicesync follow (NATS relay)",
}


def _assert_cpu_accounted(cell: dict[str, object]) -> None:
    """CPU per completed user was read for every process of the system, and some was spent."""
    cpu = cell["cpu_ms_per_user"]
    assert isinstance(cpu, dict), cell
    name = cell["system"]
    expected = {"load generator", "total"}
    if name in _TEMPORAL_BOUND:
        expected.add("temporal")
    if name != "empty workflow (ceiling)":
        expected |= {"postgres", "spicedb"}  # the ceiling writes neither store
    if name != "dual write (no durability)":
        expected.add("worker")
    if name in _RELAYS:
        expected.add("relay")
    if "NATS" in str(name):
        expected.add("nats")
    assert set(cpu) == expected, cell
    assert cpu["total"] == pytest.approx(sum(v for k, v in cpu.items() if k != "total"), abs=0.1)
    assert cpu["load generator"] > 0, cell
    if name in _TEMPORAL_BOUND:
        assert cpu["temporal"] > 0 and cpu["worker"] > 0, cell
    if name in {"spicesync", "two-activity workflow (naive)"}:
        # Both write a row and a relationship per user: the stores' own processes worked.
        assert cpu["postgres"] > 0 and cpu["spicedb"] > 0, cell


def _children(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (from /proc), with its command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found and pid_alive(child):
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                found[child] = cmdline.replace(b"\0", b" ").decode(errors="replace")
                frontier.append(child)
    return found


@pytest.mark.timeout(400)
def test_sigterm_stops_every_process_the_bench_started(
    stack_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    # The stack is up first: its processes are the stack's (`stack down` stops them), not the
    # bench's, exactly as after `make demo`.
    assert run(["stack", "up"], stack_env).returncode == 0
    out = tmp_path / "bench"
    with (tmp_path / "bench.err").open("w") as err:
        bench = subprocess.Popen(
            [*CLI, "bench", "--quick", "--systems", "spicesync", "--out", str(out)],
            env=stack_env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        # Wait for the cell: its worker process, its SpiceDB engine, and the bench's NATS.
        while not any(" worker" in cmd for cmd in started.values()):
            assert bench.poll() is None, (tmp_path / "bench.err").read_text()
            assert time.monotonic() < deadline, started
            time.sleep(0.2)
            started |= _children(bench.pid)
        time.sleep(1)
        started |= _children(bench.pid)
        assert any("spicedb_host" in cmd for cmd in started.values()), started
        assert any("nats-server" in cmd for cmd in started.values()), started

        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) == 128 + signal.SIGTERM
        survivors = {pid: cmd for pid, cmd in started.items() if pid_alive(pid)}
        assert survivors == {}, survivors
        assert "stopped by SIGTERM" in (tmp_path / "bench.err").read_text()
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in started:
            if pid_alive(pid):
                stop_pid(pid)


# A stack, then two worker processes, on a loaded 2-core box.
@pytest.mark.timeout(300)
def test_close_cost_measures_runs_that_close_against_runs_that_stay_open(
    stack_env: dict[str, str],  # noqa: F811
) -> None:
    up = run(["stack", "up"], stack_env, timeout=180)
    assert up.returncode == 0, up.stderr[-3000:]
    done = subprocess.run(
        [
            *CLI[:-2],  # the interpreter, without "-m spicesync"
            "-m",
            "bench.close_cost",
            "--users",
            "6",
            "--short-idle",
            "1",
            "--settle",
            "6",
            "--rounds",
            "1",
        ],
        env=stack_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    stays, closes, cost = lines
    # Read back from Temporal: the default idle time keeps every run open, the short one closed
    # every run within the window.
    assert stays.startswith("idle 600 s: 0/6 closed; ms per user:"), stays
    assert closes.startswith("idle 1 s: 6/6 closed; ms per user:"), closes
    for line in (stays, closes):
        for role in ("postgres", "spicedb", "temporal", "total", "worker"):
            assert f" {role} " in line, line
    assert cost.startswith("the close: ") and cost.endswith(" ms per user"), cost
