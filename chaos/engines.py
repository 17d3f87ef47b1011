"""The real processes a chaos run starts, kills and restarts.

A run has a Temporal dev server of its own (file-backed, so it can be killed and restarted like a
real cluster node); every scenario has a SpiceDB engine and an App DB database of its own on the
stack's PostgreSQL, and its own spicesync worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from spicesync.settings import Settings
from spicesync.stack.components import (
    prepare_spicedb,
    start_spicedb,
    start_temporal,
    wait_for_temporal,
)
from spicesync.stack.processes import free_port, stop_process, wait_for_port

__all__ = ["SpiceDBEngine", "TemporalServer", "WorkerProcesses", "kill_hard"]


def kill_hard(pid: int) -> None:
    """SIGKILL ``pid`` (a crash: no shutdown code runs) and reap it if it is our child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


@dataclass
class TemporalServer:
    """The run's own Temporal dev server, on a SQLite file that outlives a kill."""

    directory: Path
    port: int = field(default_factory=free_port)
    pid: int = 0

    @property
    def address(self) -> str:
        """``host:port`` for clients and workers."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start (or restart, on the same file and port) and wait until its frontend is healthy."""
        log = self.directory / "temporal.log"
        self.pid = start_temporal(
            port=self.port,
            ui_port=None,
            db_file=self.directory / "temporal.db",
            log=log,
            codec_endpoint=None,
        )
        await wait_for_temporal(self.address, pid=self.pid, timeout=60, log=log)

    def kill(self) -> None:
        """Crash it."""
        kill_hard(self.pid)


@dataclass
class SpiceDBEngine:
    """A SpiceDB engine (memory datastore) of one scenario's own."""

    directory: Path
    port: int = field(default_factory=free_port)
    key: str = field(default_factory=lambda: os.urandom(12).hex())
    pid: int = 0

    @property
    def endpoint(self) -> str:
        """``host:port`` for the authzed client."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start on this engine's port and write spicesync's schema (what ``stack up`` does)."""
        log = self.directory / f"spicedb-{self.port}.log"
        self.pid, _ = await asyncio.to_thread(
            start_spicedb, port=self.port, preshared_key=self.key, log=log
        )
        await asyncio.to_thread(
            wait_for_port, "127.0.0.1", self.port, pid=self.pid, timeout=60, log=log
        )
        await prepare_spicedb(self.endpoint, self.key)

    def kill(self) -> None:
        """Crash it: the memory datastore, and every relationship in it, is gone."""
        kill_hard(self.pid)


@dataclass
class WorkerProcesses:
    """``spicesync worker`` processes of one scenario, started, crashed and replaced at will.

    Also any other long-running spicesync process (``command``), e.g. ``relay outbox``.
    """

    settings: Settings
    task_queue: str
    database_url: str
    spicedb_endpoint: str
    spicedb_key: str
    log: Path
    trace_file: Path
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    # The spicesync command each process runs, and variables beyond the engines' (a mapping).
    command: tuple[str, ...] = ("worker",)
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The worker's whole configuration, as an operator would set it.

        Spans go to :attr:`trace_file` (never to an OTLP collector the caller may have
        configured), so the run can read what its workers exported.
        """
        env = self.settings.worker_environment(
            task_queue=self.task_queue,
            database_url=self.database_url,
            spicedb_endpoint=self.spicedb_endpoint,
            spicedb_key=self.spicedb_key,
        )
        for otlp in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            env.pop(otlp, None)
        return env | {"SPICESYNC_TRACE_FILE": str(self.trace_file)} | self.extra_env

    async def start(self, *, code_dir: Path | None = None) -> asyncio.subprocess.Process:
        """Start one worker (or one process of :attr:`command`).

        Args:
            code_dir: Run the worker of another release, whose packages (``spicesync``,
                ``workflows``, ``activities``, ``workers``) are all here; this checkout's
                code otherwise.
        """
        env = self.env()
        if code_dir is not None:
            # `python -m` puts the working directory first on sys.path, ahead of this checkout
            # (an editable install's path entry comes after it).
            env["PYTHONPATH"] = str(code_dir)
        with open(self.log, "ab") as out:  # noqa: ASYNC230 - a log file opened once per process
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spicesync",
                *self.command,
                env=env,
                cwd=str(code_dir) if code_dir is not None else None,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=out,
            )
        self.processes.append(process)
        return process

    async def crash_all(self) -> int:
        """SIGKILL every worker (no graceful shutdown); returns how many were killed."""
        killed = 0
        for process in self.processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
                killed += 1
        self.processes = []
        return killed

    async def stop_all(self) -> None:
        """SIGTERM (each worker drains), SIGKILL after 15 s."""
        await asyncio.gather(*(stop_process(p) for p in self.processes))
        self.processes = []
