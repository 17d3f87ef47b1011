"""CPU time per process, read from ``/proc``: what a measured window cost, not only how long.

A cell's figures on a shared 2-core box move with whatever else runs; the CPU each process of a
system spent per completed user moves much less. Each process is read twice, at the start and
at the end of the measured window, from ``/proc/<pid>/stat`` (``utime + stime``, in clock
ticks). A process that serves through children (PostgreSQL's postmaster forks a backend per
connection) is read as a tree: every live descendant's own time plus the time of the children
each has reaped (``cutime + cstime``), so a backend that exits inside the window still counts.
The load generator is this process, read without its children: they are the systems' workers
and engines, measured on their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: reading /proc needs neither
    import asyncpg

    from spicesync.stack.manager import StackState

__all__ = [
    "CpuWindow",
    "Watched",
    "engine_pids",
    "parent_of_postgres_backend",
    "process_cpu_seconds",
    "tree_cpu_seconds",
]

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name; ``None`` if it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces or parentheses itself.
    return text.rsplit(")", 1)[1].split()


def process_cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """CPU seconds (user + system) ``pid`` has spent; ``None`` if it is not running.

    Args:
        pid: The process.
        children: Add the time of the children it has waited for (``cutime + cstime``).
    """
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the name: state is field 3 of stat(5), so utime (14) is fields[11], cstime (17) [14].
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def parent_of_postgres_backend(pid: int) -> int | None:
    """The postmaster of backend ``pid``, if that backend is a PostgreSQL process of this host."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None  # another host's, or another namespace's
    name, rest = text.split("(", 1)[1].rsplit(")", 1)
    return int(rest.split()[1]) if name.startswith("postgres") else None


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        for child in parents.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` and every descendant, living or reaped; ``None`` if it is gone.

    A child's time moves into its parent's ``cutime`` when the parent reaps it, so each live
    process counts its own time and its reaped children's, and nothing is counted twice.
    """
    own = process_cpu_seconds(pid, children=True)
    if own is None:
        return None
    return own + sum(process_cpu_seconds(c, children=True) or 0.0 for c in _descendants(pid))


@dataclass(frozen=True)
class Watched:
    """One process to account for: its role in the table and how to read it.

    ``tree``: the process and its descendants (a server that forks); otherwise the process
    alone, without its children (the load generator, whose children are measured on their own).
    """

    role: str
    pid: int
    tree: bool = True

    def seconds(self) -> float | None:
        """CPU seconds so far; ``None`` if the process is gone."""
        if self.tree:
            return tree_cpu_seconds(self.pid)
        return process_cpu_seconds(self.pid)


@dataclass
class CpuWindow:
    """CPU each watched process spent between :meth:`start` and :meth:`stop`."""

    watched: list[Watched]
    _started: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        """Read every process at the window's start."""
        self._started.clear()
        for w in self.watched:
            seconds = w.seconds()
            if seconds is not None:
                self._started[w.role] = self._started.get(w.role, 0.0) + seconds

    def stop(self) -> dict[str, float]:
        """Read them again; returns (and keeps) the seconds each role spent in the window.

        A role whose processes were all gone at either end is left out rather than guessed.
        """
        ended: dict[str, float] = {}
        for w in self.watched:
            seconds = w.seconds()
            if seconds is not None:
                ended[w.role] = ended.get(w.role, 0.0) + seconds
        self.spent = {
            role: max(0.0, ended[role] - self._started[role])
            for role in ended
            if role in self._started
        }
        return self.spent

    def ms_per_user(self, completed: int) -> dict[str, float]:
        """Milliseconds of CPU per completed user, per role and in ``total``; empty if none."""
        if completed <= 0 or not self.spent:
            return {}
        per = {role: round(s * 1000 / completed, 2) for role, s in self.spent.items()}
        per["total"] = round(sum(self.spent.values()) * 1000 / completed, 2)
        return per


async def engine_pids(state: StackState, pool: asyncpg.Pool | asyncpg.Connection) -> dict[str, int]:
    """The pids of the shared engines this host runs: Temporal's dev server, the postmaster.

    A Temporal server elsewhere (``TEMPORAL_ADDRESS``) cannot be read from ``/proc`` and is left
    out; PostgreSQL is found from a backend of the caller's pool or connection (its parent is
    the postmaster), if that backend runs on this host.
    """
    pids: dict[str, int] = {}
    temporal = state.component("temporal")
    if temporal is not None and temporal.managed and temporal.pid:
        pids["temporal"] = temporal.pid
    postmaster = parent_of_postgres_backend(int(await pool.fetchval("SELECT pg_backend_pid()")))
    if postmaster is not None:
        pids["postgres"] = postmaster
    return pids
