"""What every measured cell shares: a fresh SpiceDB engine, a worker, readiness, the check.

Used by the rate cells (:mod:`bench.run`) and the backfill comparison (:mod:`bench.backfill`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from bench import children
from bench.ceiling import EmptyWorkflowSystem
from bench.context import BenchContext
from bench.pipeline import PipelineSystem
from spicesync.models import CreateUserInput, Membership
from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient, holds_memberships
from spicesync.stack.components import prepare_spicedb, start_spicedb
from spicesync.stack.processes import free_port, wait_for_port
from spicesync.temporal import workers_polling

__all__ = ["System", "cell_context", "fresh_spicedb", "spawn_worker", "users_held", "wait_ready"]


class System(Protocol):
    """What a system under test provides (see the modules of :mod:`bench`)."""

    name: str
    has_rows: bool

    def worker_command(self) -> list[str] | None:
        """The worker process to start, or ``None`` if the system needs none.

        Optional members, looked up when present: ``prepare(ctx)`` and ``close(ctx)`` around
        the cell, ``relay_command()`` for a second process, ``process_env(ctx)`` for both
        processes' extra environment, ``ready(ctx)`` for when the load may start, and
        ``synced_query`` for :func:`bench.harness.wait_done`.
        """

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """Deliver one creation the way this system's application would."""

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """When each user's row and membership were done (``None``: no row)."""


async def fresh_spicedb(log_dir: Path) -> tuple[int, str, str]:
    """Start an empty SpiceDB engine with the schema; returns its pid, endpoint and key."""
    port, key = free_port(), uuid.uuid4().hex
    log = log_dir / f"spicedb-{port}.log"

    def start() -> int:
        # Recorded in the thread that starts it: a cancelled run still knows to stop it.
        return children.record(start_spicedb(port=port, preshared_key=key, log=log)[0])

    pid = await asyncio.to_thread(start)
    await asyncio.to_thread(wait_for_port, "127.0.0.1", port, pid=pid, timeout=60, log=log)
    await prepare_spicedb(f"127.0.0.1:{port}", key)
    return pid, f"127.0.0.1:{port}", key


async def users_held(spicedb: SpiceDBClient, users: list[CreateUserInput]) -> set[str]:
    """Users whose membership SpiceDB grants, checked independently (fully consistent)."""
    answers = await holds_memberships(
        spicedb, [Membership(user_id=u.user_id, org_id=u.org_id, role=u.role) for u in users]
    )
    return {u.user_id for u, held in zip(users, answers, strict=True) if held}


async def wait_ready(ctx: BenchContext, system: System) -> None:
    """Wait until the system's worker polls (or its consumer had time to subscribe)."""
    ready = getattr(system, "ready", None)
    if ready is not None:
        # The system can tell (follow mode: its worker polls and its relay LISTENs).
        deadline = time.monotonic() + 60
        while not await ready(ctx):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system.name}: not ready within 60 s")
            await asyncio.sleep(0.2)
    elif isinstance(system, EmptyWorkflowSystem | PipelineSystem):
        deadline = time.monotonic() + 60
        while not await workers_polling(ctx.client, ctx.task_queue):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system.name}: no worker polled within 60 s")
            await asyncio.sleep(0.2)
    else:
        await asyncio.sleep(1.5)  # the consumer or relay connects and subscribes


def cell_context(
    nats_url: str | None,
    settings: Settings,
    shared: dict[str, Any],
    endpoint: str,
    key: str,
    spicedb: SpiceDBClient,
    run: str,
    task_queue: str,
) -> BenchContext:
    """The context of one measurement: the shared engines plus this cell's SpiceDB."""
    return BenchContext(
        settings=settings,
        client=shared["client"],
        database_url=shared["database_url"],
        pool=shared["pool"],
        spicedb_endpoint=endpoint,
        spicedb_key=key,
        spicedb=spicedb,
        task_queue=task_queue,
        nats_url=nats_url,
        run=run,
    )


async def spawn_worker(
    command: list[str],
    ctx: BenchContext,
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    role: str = "worker",
) -> asyncio.subprocess.Process:
    """Start a system's worker (or relay) process on the cell's engines, its output in ``log_dir``.

    Args:
        command: The process to run.
        ctx: The cell.
        log_dir: Where its log goes (``<role>-<run>.log``).
        env: Variables added to the cell's worker environment.
        role: What the process is, for its log's name.
    """
    with open(log_dir / f"{role}-{ctx.run}.log", "wb") as log:  # noqa: ASYNC230
        process = await asyncio.create_subprocess_exec(
            *command,
            env=ctx.worker_env() | (env or {}),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
    children.record(process.pid)
    return process
