"""Every process the benchmark starts, so that none outlives it, SIGTERM or Ctrl-C included.

Each cell's worker and SpiceDB engine and the benchmark's NATS server are recorded here the
moment they exist. The cells stop their own processes as they finish; :func:`stop_all` is the
backstop for a run cut short (a step cancelled between starting a process and handing it
back). The local stack's processes are not the benchmark's: ``spicesync stack down`` owns them.
"""

from __future__ import annotations

from spicesync.stack.processes import pid_alive, stop_pid

__all__ = ["record", "stop_all"]

_started: set[int] = set()


def record(pid: int) -> int:
    """Remember a process this run started; returns ``pid``."""
    _started.add(pid)
    return pid


def stop_all() -> list[int]:
    """Stop (SIGTERM, then SIGKILL) every recorded process still running; returns their pids."""
    alive = [pid for pid in sorted(_started) if pid_alive(pid)]
    for pid in alive:
        stop_pid(pid)
    _started.clear()
    return alive
