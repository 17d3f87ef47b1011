"""The benchmark's outputs: a markdown table, JSON, and a plot of latency against offered rate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["CPU_ROLES", "cpu_table", "markdown", "plot", "write_json"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# The CPU table's columns: the roles of bench/cpu.py, in the order a sync passes through them.
CPU_ROLES = ("load generator", "temporal", "worker", "relay", "nats", "postgres", "spicedb")


def cpu_table(results: list[dict[str, Any]]) -> list[str]:
    """Milliseconds of CPU per completed user, per process and in total, one row per cell."""
    lines = [
        "| system | offered/s | " + " | ".join(CPU_ROLES) + " | total |",
        "| --- | ---: | " + " | ".join("---:" for _ in CPU_ROLES) + " | ---: |",
    ]
    for r in results:
        cpu = r.get("cpu_ms_per_user") or {}
        cells = [_cpu(cpu.get(role)) for role in (*CPU_ROLES, "total")]
        lines.append(f"| {r['system']} | {r['offered_rate']:g} | " + " | ".join(cells) + " |")
    return lines


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def markdown(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One row per system and offered rate, the CPU each cost per user, then the targets."""
    lines = [
        "| system | offered/s | completed/s | start call p50/p99 ms | time-to-row p50/p99 ms"
        " | time-to-permission p50/p95/p99 ms | failed calls (p99 ms) | not done at the drain"
        " | of those, finished later | lost |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        s, row, perm = r["start_call_ms"], r["time_to_row_ms"], r["time_to_permission_ms"]
        refused = r.get("failed_calls", 0)
        refused_p99 = (r.get("failed_call_ms") or {}).get("p99")
        failed = f"{refused} ({_ms(refused_p99)})" if refused else "0"
        lines.append(
            f"| {r['system']} | {r['offered_rate']:g} | {r['completed_per_second']:.1f}"
            f" | {_ms(s['p50'])} / {_ms(s['p99'])} | {_ms(row['p50'])} / {_ms(row['p99'])}"
            f" | {_ms(perm['p50'])} / {_ms(perm['p95'])} / {_ms(perm['p99'])}"
            f" | {failed} | {r['not_done']} | {r['late']} | {r['lost']} |"
        )
    lines += ["", "CPU per completed user (ms, measured window; `-`: no such process):", ""]
    lines += cpu_table(results)
    if summary:
        lines.append("")
        for key, value in summary.items():
            lines.append(f"- **{key}**: {value}")
    return "\n".join(lines) + "\n"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Everything, machine-readable."""
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    """p50 (dashed) and p99 (solid) time-to-permission against offered rate, per system."""
    # A Figure of its own, not pyplot: no GUI backend and no global figure registry.
    fig = Figure(figsize=(9, 5.5), dpi=110)
    ax = fig.subplots()
    systems = sorted({r["system"] for r in results})
    for index, system in enumerate(systems):
        rows = sorted(
            (r for r in results if r["system"] == system), key=lambda r: r["offered_rate"]
        )
        rates = [r["offered_rate"] for r in rows]
        color = f"C{index}"
        p99 = [r["time_to_permission_ms"]["p99"] for r in rows]
        p50 = [r["time_to_permission_ms"]["p50"] for r in rows]
        ax.plot(rates, p99, marker="o", color=color, label=f"{system} p99")
        ax.plot(rates, p50, linestyle="--", marker=".", color=color, label=f"{system} p50")
    ax.set_xlabel("offered rate (users/s, open loop)")
    ax.set_ylabel("time to permission (ms, log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("spicesync vs the alternatives: latency until SpiceDB reflects a new user")
    fig.tight_layout()
    fig.savefig(path)
