"""``spicesync reconcile``, ``backfill``, ``bench`` and ``chaos``: run, show progress, report.

What each needs is imported when it runs, so that ``--help`` loads nothing heavy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from spicesync.cli.progress import show as _show

if TYPE_CHECKING:
    from temporalio.client import Client, WorkflowHandle

    from spicesync.models import ReconcileReport
    from spicesync.settings import Settings

__all__ = ["backfill_command", "bench_command", "chaos_command", "reconcile_command"]

T = TypeVar("T")


class NoWorker(RuntimeError):
    """Nothing polls the task queue, so a started run would wait forever."""


async def _connect(settings: Settings) -> Client:
    from spicesync.temporal import connect_temporal, workers_polling

    client = await connect_temporal(settings)
    if not await workers_polling(client, settings.task_queue):
        raise NoWorker(
            f"no worker polls task queue {settings.task_queue!r}; start one with"
            " `spicesync worker` (the run would wait for it)"
        )
    return client


async def _query_progress(handle: WorkflowHandle[Any, Any], query: Any) -> Any | None:
    """The run's progress, or ``None`` while no worker answers queries.

    Workers restart and drain (SIGTERM gives in-flight activities a grace period, during which
    that worker polls nothing): the progress line waits for the next one, and the wait for the
    run's result goes on.
    """
    from temporalio.client import WorkflowQueryFailedError, WorkflowQueryRejectedError
    from temporalio.service import RPCError

    try:
        return await handle.query(query, rpc_timeout=timedelta(seconds=5))
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
        return None


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width if total <= 0 else min(width, width * done // total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def reconcile_command(args: argparse.Namespace) -> int:
    """Run a reconcile now (or set its schedule) and print the report."""
    from spicesync.models import ReconcileInput
    from spicesync.settings import load_settings
    from spicesync.temporal import connect_temporal
    from starters.reconcile import (
        ReconcileAlreadyRunning,
        ensure_reconcile_schedule,
        start_reconcile,
    )
    from workflows.reconcile import ReconcileWorkflow

    settings = load_settings()
    follow = _follow_mode(settings)
    if follow is None:
        return 2
    request = ReconcileInput(
        dry_run=not args.apply,
        prune_cap=settings.reconcile_prune_cap if args.prune_cap is None else args.prune_cap,
        page_size=args.page_size,
        follow=follow,
    )

    async def schedule() -> str:
        client = await connect_temporal(settings)
        return await ensure_reconcile_schedule(
            timedelta(seconds=args.schedule_every), request, client=client
        )

    async def run_now() -> ReconcileReport:
        client = await _connect(settings)
        handle = await start_reconcile(request, client=client, task_queue=settings.task_queue)
        result = asyncio.ensure_future(handle.result())
        while not result.done():
            await asyncio.wait([result], timeout=1.0)
            if result.done():
                break
            p = await _query_progress(handle, ReconcileWorkflow.progress)
            if p is None:
                continue
            _show(
                f"reconcile {p.phase}: {p.rows_scanned} rows, {p.relationships_scanned}"
                f" relationships scanned; {p.found.total()} drifted users so far"
            )
        print(file=sys.stderr)
        return result.result()

    try:
        if args.schedule_every is not None:
            schedule_id = asyncio.run(schedule())
            mode = "apply" if args.apply else "dry run"
            print(f"schedule {schedule_id}: a reconcile ({mode}) every {args.schedule_every:g} s")
            return 0
        report = asyncio.run(run_now())
    except (NoWorker, ReconcileAlreadyRunning) as err:
        print(f"spicesync: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(report.model_dump_json())
    else:
        print(_reconcile_summary(report, follow=request.follow))
    return 3 if report.prune_cap_exceeded else 0


def _follow_mode(settings: Settings) -> bool | None:
    """Whether a mapping is configured (follow mode); ``None`` after saying why it is invalid."""
    from spicesync.mapping import MappingError

    try:
        return settings.follow_mapping() is not None
    except MappingError as err:
        print(f"spicesync: {err}", file=sys.stderr)
        return None


def _reconcile_summary(r: ReconcileReport, *, follow: bool = False) -> str:
    f = r.found
    drift = (
        f"missing {f.missing}, extra {f.extra}, orphan {f.orphan}, unmappable {f.unmappable},"
        f" unsynced {f.unsynced}; {r.deletions_planned} relationships of users left with none"
        if follow
        else f"missing {f.missing}, mismatched {f.mismatched}, orphan {f.orphan}, unfinished"
        f" {f.unfinished}, unsynced {f.unsynced}; {r.deletions_planned} relationships"
    )
    lines = [
        f"{'dry run' if r.dry_run else 'reconcile'}: {r.message}",
        f"  scanned      {r.rows_scanned} {'mapped table' if follow else 'App DB'} rows"
        f" ({r.rows_scanned_per_second:g}/s), {r.relationships_scanned} SpiceDB relationships "
        f"({r.relationships_scanned_per_second:g}/s); {r.in_flight_skipped} live syncs skipped",
        f"  drift        {drift} to delete (cap {r.prune_cap})",
    ]
    if not r.dry_run and follow:
        lines.append(
            f"  repairs      {r.repairs.delivered} changes delivered to the users' workflows,"
            f" {r.repairs.failed} failed"
        )
    elif not r.dry_run:
        lines.append(
            f"  repairs      {r.repairs.repaired} repaired, {r.repairs.removed_unfinished}"
            f" unfinished creations removed, {r.repairs.consistent} consistent by "
            f"their turn, {r.repairs.failed} failed; {r.repairs.relationships_written} "
            f"relationships written ({r.relationships_written_per_second:g}/s)"
        )
    for kind, ids in sorted(r.samples.items()):
        lines.append(f"  {kind:<12} e.g. {', '.join(ids)}")
    lines.append(f"  took         {r.seconds:.1f} s")
    return "\n".join(lines)


def backfill_command(args: argparse.Namespace) -> int:
    """Start (or rejoin) the backfill, show a progress bar, print the figures."""
    from spicesync.models import BackfillInput
    from spicesync.settings import load_settings
    from starters.backfill import start_backfill
    from workflows.backfill import BackfillWorkflow

    settings = load_settings()
    follow = _follow_mode(settings)
    if follow is None:
        return 2

    async def run() -> int:
        client = await _connect(settings)
        handle = await start_backfill(
            BackfillInput(
                batch_size=args.batch_size,
                max_rate=args.max_rate,
                # Follow mode walks the application's ids in one lane.
                lanes=1 if follow else args.lanes,
                follow=follow,
            ),
            client=client,
            task_queue=settings.task_queue,
        )
        began = time.monotonic()
        result = asyncio.ensure_future(handle.result())
        while not result.done():
            await asyncio.wait([result], timeout=0.5)
            p = await _query_progress(handle, BackfillWorkflow.progress)
            if p is None:
                continue
            done_users = p.delivered if follow else p.written_users
            rate = done_users / max(time.monotonic() - began, 1e-9)
            _show(
                f"backfill {_bar(p.scanned, p.total)} {p.scanned}/{p.total} "
                f"{'rows' if follow else 'users'} ({done_users} "
                f"{'delivered' if follow else 'written'}, {p.skipped} skipped) {rate:,.0f} users/s"
            )
        print(file=sys.stderr)
        done = result.result()
        figures = {
            "users_scanned": done.progress.scanned,
            "users_written": done.progress.written_users,
            "users_skipped": done.progress.skipped,
            "relationships_written": done.progress.relationships_written,
            "version_markers": done.progress.version_markers,
            "changes_delivered": done.progress.delivered,
            "rows_scanned_per_second": done.rows_scanned_per_second,
            "relationships_written_per_second": done.relationships_written_per_second,
            "seconds": round(done.progress.elapsed_seconds, 2),
        }
        if args.json:
            print(json.dumps(figures))
        elif follow:
            print(
                f"backfill: {figures['changes_delivered']} changes delivered to the users'"
                f" workflows, which sync them ({figures['users_skipped']} rows skipped: synced"
                f" before, or an id no workflow can have) in {figures['seconds']} s;"
                f" {figures['rows_scanned_per_second']:g} rows scanned/s"
            )
        else:
            markers = (
                " (with version markers: a user sync of an earlier release is running)"
                if figures["version_markers"]
                else ""
            )
            print(
                f"backfill: {figures['users_written']} users written "
                f"({figures['users_skipped']} skipped: a live sync had written them), "
                f"{figures['relationships_written']} relationships in {figures['seconds']} s"
                f"{markers}; "
                f"{figures['rows_scanned_per_second']:g} rows scanned/s, "
                f"{figures['relationships_written_per_second']:g} relationships written/s"
            )
        return 0

    try:
        return asyncio.run(run())
    except NoWorker as err:
        print(f"spicesync: {err}", file=sys.stderr)
        return 2


def _usable_folder(command: str, out: str) -> Path | None:
    """``--out`` as a folder that exists now, or ``None`` after saying why it cannot be."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"spicesync {command}: argument --out: {out}: {err.strerror or err}", file=sys.stderr)
        return None
    return folder


def _stoppable(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, with SIGTERM cancelling it as Ctrl-C does, so its cleanup runs.

    Without this, SIGTERM ends the process on the spot and every child it started (workers,
    SpiceDB engines, servers) keeps running. A second SIGTERM is ignored: cleanup is under way.

    Raises:
        asyncio.CancelledError: SIGTERM arrived; ``main``'s cleanup has run.
    """

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def cancel() -> None:
            loop.add_signal_handler(signal.SIGTERM, lambda: None)
            task.cancel("SIGTERM")

        loop.add_signal_handler(signal.SIGTERM, cancel)
        try:
            return await main
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(guarded())


def bench_command(args: argparse.Namespace) -> int:
    """Run ``spicesync bench`` and print where the outputs are.

    Every process the run starts stops with it, also when it is stopped by SIGTERM (exit 143).
    """
    from bench import children
    from bench.run import BenchOptions, known_systems, run_bench

    known = [system.name for system in known_systems()]
    unknown = [name for name in args.systems or [] if name not in known]
    if unknown:
        print(
            f"spicesync bench: argument --systems: unknown {', '.join(map(repr, unknown))};"
            f" choose from {', '.join(map(repr, known))}",
            file=sys.stderr,
        )
        return 2
    out = _usable_folder("bench", args.out)
    if out is None:
        return 2
    if args.quick:
        rates, seconds, backfill_users = [10.0], 4.0, 2_000
    else:
        rates, seconds, backfill_users = [10.0, 25.0, 50.0, 100.0], 12.0, 100_000
    options = BenchOptions(
        rates=args.rates or rates,
        seconds=args.seconds or seconds,
        out=out,
        backfill_users=args.backfill_users or backfill_users,
        nats_url=args.nats_url,
        systems=args.systems,
    )
    try:
        payload = _stoppable(run_bench(options))
    except asyncio.CancelledError:
        stopped = children.stop_all()
        print(
            "spicesync bench: stopped by SIGTERM; the processes it started are stopped"
            + (f" (pids {', '.join(map(str, stopped))} by the last sweep)" if stopped else ""),
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    finally:
        children.stop_all()  # Ctrl-C, or a failure between starting a process and using it
    print((options.out / "bench.md").read_text())
    print(f"outputs: {options.out}/bench.md, bench.json, bench.png")
    problems = [
        f"{c['system']} @ {c['offered_rate']}/s: "
        + ("no figures" if not c["completed"] else f"{c['lost']} lost")
        for c in payload["cells"]
        if not c["completed"] or c["lost"]
    ]
    if args.quick:
        # The quick run is light enough that everything must have finished.
        problems += [
            f"{c['system']}: {c['not_done']} not done" for c in payload["cells"] if c["not_done"]
        ]
        if payload["backfill"]["sample_holding"] != payload["backfill"]["sample_checked"]:
            problems.append("backfill: a sampled user lacks its permission")
    for problem in problems:
        print(f"spicesync bench: {problem}", file=sys.stderr)
    return 1 if problems else 0


def chaos_command(args: argparse.Namespace) -> int:
    """Run ``spicesync chaos``; exit 1 if any scenario lost, half-wrote or duplicated a user.

    ``--scenario`` is checked by the parser against :mod:`chaos.catalogue`.
    """
    from chaos.run import ChaosOptions, run_chaos
    from chaos.scenarios import SCENARIOS

    out = _usable_folder("chaos", args.out)
    if out is None:
        return 2
    options = ChaosOptions(
        users=args.users,
        outage_seconds=args.outage_seconds,
        out=out,
        scenarios=args.scenario or list(SCENARIOS),
    )
    try:
        results = _stoppable(run_chaos(options))
    except asyncio.CancelledError:
        print("spicesync chaos: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    print((options.out / "chaos.md").read_text())
    print(f"outputs: {options.out}/chaos.md, chaos.json")
    failed = [r["scenario"] for r in results if not r["passed"]]
    if failed:
        print(f"spicesync chaos: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
