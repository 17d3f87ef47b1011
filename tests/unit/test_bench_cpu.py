"""The benchmark's CPU accounting (bench/cpu.py) against processes that time themselves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.cpu import CpuWindow, Watched, process_cpu_seconds, tree_cpu_seconds

# Burns CPU until its own clock says `seconds`, prints that clock, waits for a line on stdin.
_BUSY = """
import sys, time
seconds = float(sys.argv[1])
start = time.process_time()
while time.process_time() - start < seconds:
    pass
print(time.process_time(), flush=True)
sys.stdin.readline()
"""
# Starts the busy child, reaps it, then reports and waits: its time is now in our cutime.
_PARENT = """
import subprocess, sys
busy = sys.argv[1]
child = subprocess.run([sys.executable, "-c", busy, sys.argv[2]], input=b"\\n", capture_output=True)
print(float(child.stdout), flush=True)
sys.stdin.readline()
"""
# The clock tick is 10 ms; the interpreter's start-up (before `start`) is the rest of the margin.
_MARGIN = 0.15


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("\n")
    process.stdin.close()
    process.wait(timeout=30)


def test_a_busy_process_is_measured_as_it_measures_itself() -> None:
    busy = _spawn(_BUSY, "0.4")
    try:
        assert busy.stdout is not None
        own = float(busy.stdout.readline())  # it is done burning and waits
        measured = process_cpu_seconds(busy.pid)
        assert measured is not None
        assert own <= measured + 0.02 and measured - own < _MARGIN, (own, measured)
    finally:
        _finish(busy)


def test_a_window_counts_a_reaped_child_of_a_watched_tree() -> None:
    # The pattern of PostgreSQL's backends: a child works, exits, and its parent reaps it.
    parent = _spawn(_PARENT, _BUSY, "0.3")
    window = CpuWindow([Watched("server", parent.pid)])
    window.start()  # the parent has barely started: nearly nothing yet
    try:
        assert parent.stdout is not None
        child_own = float(parent.stdout.readline())
        spent = window.stop()
        assert spent["server"] >= child_own - 0.02, (spent, child_own)
        # Read without its tree, the parent alone spent far less than its child did.
        alone = process_cpu_seconds(parent.pid)
        assert alone is not None and alone < spent["server"]
        assert window.ms_per_user(3)["total"] == pytest.approx(spent["server"] * 1000 / 3, 0.01)
    finally:
        _finish(parent)


def test_a_live_child_counts_in_its_parents_tree() -> None:
    parent = _spawn(
        "import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', sys.argv[1], '0.3'],"
        " stdout=subprocess.PIPE, stdin=subprocess.PIPE); print(float(c.stdout.readline()),"
        " flush=True); sys.stdin.readline(); c.communicate(b'\\n')",
        _BUSY,
    )
    try:
        assert parent.stdout is not None
        child_own = float(parent.stdout.readline())  # the child is alive, waiting
        tree = tree_cpu_seconds(parent.pid)
        assert tree is not None and tree >= child_own - 0.02
    finally:
        _finish(parent)


def test_a_process_that_is_gone_is_left_out_not_guessed() -> None:
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert done.returncode == 0
    window = CpuWindow([Watched("me", os.getpid(), tree=False), Watched("gone", 2**22 + 1)])
    window.start()
    spent = window.stop()
    assert set(spent) == {"me"}
    assert window.ms_per_user(0) == {}
