"""Run the scenarios one after another and write the table (markdown and JSON)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chaos.engines import TemporalServer
from chaos.scenarios import SCENARIOS
from chaos.scene import ChaosRun, new_scene
from chaos.verdict import ScenarioResult
from spicesync.settings import load_settings
from spicesync.stack.manager import stack_up
from spicesync.temporal import connect_temporal
from starters.reconcile import schedule_as_configured

__all__ = ["ChaosOptions", "markdown", "run_chaos"]


@dataclass
class ChaosOptions:
    """Users per scenario, the outage length, which scenarios, and where to write."""

    users: int
    outage_seconds: float
    out: Path
    scenarios: list[str]


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per scenario, then each scenario's notes and any problem found."""
    lines = [
        "| scenario | users | accepted | synced | compensated | rejected | lost | half-written"
        " | orphans | duplicates | unsettled | recovery s | result |",
        "| --- " + "| ---: " * 11 + "| --- |",
    ]
    for r in results:
        recovery = "-" if r["recovery_seconds"] is None else f"{r['recovery_seconds']:.1f}"
        lines.append(
            f"| {r['scenario']} | {r['users']} | {r['accepted']} | {r['synced']}"
            f" | {r['compensated']} | {r['rejected']} | {r['lost']} | {r['half_written']}"
            f" | {r['orphans']} | {r['duplicates']} | {r['unsettled']} | {recovery}"
            f" | {'pass' if r['passed'] else '**FAIL**'} |"
        )
    lines.append("")
    for r in results:
        for note in r["notes"]:
            lines.append(f"- {r['scenario']}: {note}")
        for problem in r["problems"][:10]:
            lines.append(f"- {r['scenario']}: **problem**: {problem}")
    return "\n".join(lines) + "\n"


async def run_chaos(options: ChaosOptions) -> list[dict[str, Any]]:
    """Run every chosen scenario on fresh stores; write ``chaos.md`` and ``chaos.json``."""
    options.out.mkdir(parents=True, exist_ok=True)
    work = options.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    # PostgreSQL (and the engine library) come from the local stack; Temporal is the run's own.
    await stack_up(load_settings(), on_ready=schedule_as_configured)
    temporal = TemporalServer(work)
    await temporal.start()
    settings = load_settings(temporal_address=temporal.address)
    started = datetime.now(UTC)
    results: list[dict[str, Any]] = []
    try:
        client = await connect_temporal(settings)
        run = ChaosRun(
            settings=settings,
            temporal=temporal,
            client=client,
            directory=work,
            users=options.users,
            outage_seconds=options.outage_seconds,
        )
        for name in options.scenarios:
            began = time.monotonic()
            print(f"chaos: {name} ({options.users} users) ...", file=sys.stderr, flush=True)
            async with new_scene(run, name) as scene:
                try:
                    await SCENARIOS[name](scene)
                except Exception as err:
                    scene.result.passed = False
                    scene.result.problems.append(f"scenario crashed: {err!r}")
                    traceback.print_exc()
                result: ScenarioResult = scene.result
            results.append(result.as_dict())
            print(
                f"chaos: {name}: {'pass' if result.passed else 'FAIL'}"
                f" in {time.monotonic() - began:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            # After every scenario, so an interrupted run still leaves what it found.
            _write(options, started, results)
    finally:
        temporal.kill()
    _write(options, started, results)
    return results


def _write(options: ChaosOptions, started: datetime, results: list[dict[str, Any]]) -> None:
    payload = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores",
        "users_per_scenario": options.users,
        "outage_seconds": options.outage_seconds,
        "scenarios": results,
    }
    (options.out / "chaos.json").write_text(json.dumps(payload, indent=2) + "\n")
    (options.out / "chaos.md").write_text(
        f"# spicesync chaos, {started:%Y-%m-%d %H:%M} UTC, {options.users} users per scenario\n\n"
        + markdown(results)
    )
