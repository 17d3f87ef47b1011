"""What closing a user's run costs: the part of a user's CPU that ``spicesync bench`` leaves out.

A user's workflow waits ``idle_seconds`` (10 minutes by default) for more events before it
closes, long after a bench cell's window; the close (the idle timer firing, one more workflow
task, a replay if the run has left the worker's cache, the close itself) is then missing from
the cell's CPU per user. This measures it on the local stack: new users at a steady rate through
``create_user(..., wait=WaitFor.START, idle=...)``, once with the default idle time (nothing
closes in the window) and once with a short one (every run closes in it), alternating. Each
pass has a worker of its own on a fresh task queue; the CPU of the dev server, that worker,
PostgreSQL and SpiceDB is read from ``/proc`` from the first start until ``--settle`` seconds
after the last::

    spicesync stack up
    python -m bench.close_cost --users 300 --rate 10 --rounds 2
    python -m bench.close_cost --cache 20    # every run evicted before its close

The difference between the two passes of a round is what the close costs per user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from temporalio.client import Client, WorkflowExecutionStatus

from bench.cpu import CpuWindow, Watched, engine_pids
from spicesync.constants import user_workflow_id
from spicesync.models import CreateUserInput, UserSyncInput
from spicesync.settings import Settings, load_settings
from spicesync.stack.manager import StackState
from spicesync.temporal import connect_temporal
from starters.user_events import WaitFor, create_user

__all__ = ["Pass", "closed", "main", "measure_pass"]

_DEFAULT_IDLE = UserSyncInput.model_fields["idle_seconds"].default


@dataclass
class Pass:
    """One pass: its users, their runs' idle time, and the CPU each process spent per user."""

    idle_seconds: float
    user_ids: list[str]
    ms_per_user: dict[str, float]


async def _engines(settings: Settings) -> list[Watched]:
    """The stack's dev server, postmaster and SpiceDB, as this host runs them."""
    state = StackState.load(settings.state_dir)
    conn = await asyncpg.connect(settings.require_database_url())
    try:
        pids = await engine_pids(state, conn)
    finally:
        await conn.close()
    # The bench starts a SpiceDB per cell; here the stack's own one serves every pass.
    spicedb = state.component("spicedb")
    if spicedb is not None and spicedb.managed and spicedb.pid:
        pids["spicedb"] = spicedb.pid
    return [Watched(name, pid) for name, pid in pids.items()]


async def _worker(
    settings: Settings, task_queue: str, cache: int | None
) -> tuple[asyncio.subprocess.Process, asyncio.Task[bytes]]:
    """A ``spicesync worker`` on ``task_queue``, polling when this returns, and its log's reader."""
    endpoint, key = settings.require_spicedb()
    env = settings.worker_environment(
        task_queue=task_queue,
        database_url=settings.require_database_url(),
        spicedb_endpoint=endpoint,
        spicedb_key=key,
    )
    if cache is not None:
        env["SPICESYNC_WORKER_MAX_CACHED_WORKFLOWS"] = str(cache)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spicesync",
        "worker",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(60):
            line = await process.stderr.readline()
            while b"worker polling task queue" not in line:
                if not line:  # the end of its log: it exited
                    raise RuntimeError("the worker exited before it polled")
                line = await process.stderr.readline()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
        raise
    # Keep reading its log, so that a full pipe never blocks it.
    return process, asyncio.ensure_future(process.stderr.read())


async def measure_pass(
    client: Client,
    settings: Settings,
    *,
    users: int,
    rate: float,
    idle_seconds: float,
    settle: float,
    cache: int | None = None,
) -> Pass:
    """Create ``users`` new users at ``rate`` whose runs idle ``idle_seconds``; measure the CPU.

    Args:
        client: A client with spicesync's data converter.
        settings: The local stack's settings.
        users: How many new users.
        rate: Users per second.
        idle_seconds: The runs' idle time before they close.
        settle: Seconds after the last start until the window ends.
        cache: The worker's workflow cache size; the default without it.
    """
    task_queue = f"close-cost-{uuid.uuid4().hex[:8]}"
    worker, log = await _worker(settings, task_queue, cache)
    try:
        window = CpuWindow([*await _engines(settings), Watched("worker", worker.pid)])
        window.start()
        user_ids: list[str] = []
        starts = []
        for i in range(users):
            user = CreateUserInput(
                user_id=str(uuid.uuid4()),
                email=f"close-cost-{task_queue}-{i}@example.com",
                name="Close Cost",
                org_id="acme",
                role="member",
            )
            user_ids.append(user.user_id)
            starts.append(
                asyncio.ensure_future(
                    create_user(
                        user,
                        wait=WaitFor.START,
                        client=client,
                        task_queue=task_queue,
                        idle=timedelta(seconds=idle_seconds),
                    )
                )
            )
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*starts)
        await asyncio.sleep(settle)
        window.stop()
        return Pass(idle_seconds, user_ids, window.ms_per_user(users))
    finally:
        with contextlib.suppress(ProcessLookupError):
            worker.terminate()
        await worker.wait()
        await log


async def closed(client: Client, user_ids: Sequence[str]) -> int:
    """How many of the users' runs have closed (completed)."""
    count = 0
    for user_id in user_ids:
        description = await client.get_workflow_handle(user_workflow_id(user_id)).describe()
        count += description.status == WorkflowExecutionStatus.COMPLETED
    return count


def _row(p: Pass, closes: int) -> str:
    cells = " ".join(f"{k} {v:.1f}" for k, v in sorted(p.ms_per_user.items()))
    return f"idle {p.idle_seconds:g} s: {closes}/{len(p.user_ids)} closed; ms per user: {cells}"


async def _run(args: argparse.Namespace) -> None:
    settings = load_settings()
    client = await connect_temporal(settings)
    for _ in range(args.rounds):
        passes = []
        for idle in (_DEFAULT_IDLE, args.short_idle):
            p = await measure_pass(
                client,
                settings,
                users=args.users,
                rate=args.rate,
                idle_seconds=idle,
                settle=args.settle,
                cache=args.cache,
            )
            passes.append(p)
            print(_row(p, await closed(client, p.user_ids)), flush=True)
        stays, closes = passes
        total = closes.ms_per_user["total"] - stays.ms_per_user["total"]
        print(f"the close: {total:+.1f} ms per user", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, measure, print a line per pass and the close's cost per round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--short-idle", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=25.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", type=int, default=None, help="the worker's workflow cache")
    args = parser.parse_args(argv)
    if args.settle <= args.short_idle:
        parser.error("--settle must be longer than --short-idle, so every short run closes")
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    code = main()
    # The Temporal client's native threads outlive asyncio.run; in about one exit of five one of
    # them was still releasing the GIL as the interpreter finalized, which aborts the process
    # (PyGILState_Release) after its work is done. Everything is printed and flushed by now,
    # so leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
