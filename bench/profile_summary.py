"""Where a worker's Python time goes: a py-spy ``--format raw`` profile summed per category.

Used to write docs/performance.md's "Where the time goes"::

    py-spy record --pid <worker> --gil --rate 100 --duration 40 --format raw -o worker.raw
    python -m bench.profile_summary worker.raw

Each line of a raw profile is one stack (frames joined by ``;``, outermost first) and its sample
count. A sample under the creation of a new workflow instance (the sandbox re-imports the
workflow's modules for every instance) or under the span export thread goes to that category
whatever runs below it, since that is the cost a change there would remove; any other sample goes
to the category of its innermost frame that matches a rule (the library doing the work, not the
interceptor or SDK frame that called it). The worker's start-up (imports, the build id's hash of
every module, library instrumentation) is left out: it is paid once per process, not per user.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

__all__ = ["STARTUP", "categorise", "main", "summarise"]

# py-spy prints paths relative to site-packages: OpenTelemetry's modules appear as trace/...,
# _shared_internal/..., attributes/..., and so on, without an "opentelemetry/" prefix.
_WHOLE_STACK = [
    (
        "sandbox: new workflow instance (module re-import, restrictions)",
        re.compile(r"_create_workflow_instance|SandboxedWorkflowRunner\.create_instance"),
    ),
    (
        "tracing: span export (BatchSpanProcessor thread: scrub, to_json, write)",
        re.compile(r"BatchProcessor|span_scrubbing|SpanExporter"),
    ),
]
_INNERMOST = [
    (
        "tracing: OpenTelemetry spans, context propagation",
        r"opentelemetry|\((trace/|_shared_internal/|attributes/|context/|baggage/|propagate/"
        r"|resources/|instrumentation/)|composite\.py|_semconv\.py|_decorator\.py"
        r"|\(util/__init__\.py",
    ),
    ("encryption: AES-GCM codec", r"spicesync/codec\.py|cryptography"),
    (
        "payload conversion (pydantic converter, payload visitors)",
        r"temporalio/converter|temporalio/contrib/pydantic|pydantic|_visitor\.py|\(json/",
    ),
    ("logging", r"\(logging/|spicesync/logs\.py"),
    ("asyncpg (PostgreSQL driver)", r"asyncpg/"),
    ("gRPC to SpiceDB (grpc aio, authzed)", r"\(grpc/|authzed|spicesync/spicedb\.py"),
    ("workflow code (workflows/)", r"\(workflows/"),
    ("activity code (activities/)", r"\(activities/"),
    (
        "workflow activation in the sandbox (SDK)",
        r"_workflow_instance\.py|workflow_sandbox|temporalio/workflow\.py",
    ),
    ("activity task handling (SDK)", r"temporalio/worker/_activity\.py"),
    ("workflow task handling, bridge to the SDK core", r"temporalio/(worker|bridge)"),
    ("asyncio event loop, threads", r"asyncio/|threading|concurrent/|selectors"),
]
_INNERMOST_RX = [(name, re.compile(rule)) for name, rule in _INNERMOST]

STARTUP = re.compile(r"Worker\.__init__|load_default_build_id|instrument_libraries")
"""Frames of the worker's start-up, paid once per process."""


def categorise(frames: list[str]) -> str | None:
    """The category of one stack (outermost frame first); ``None`` for start-up."""
    if any(STARTUP.search(f) for f in frames):
        return None
    if not any("asyncio/runners.py" in f or "thread" in f.lower() for f in frames):
        return None  # module-level code of the process's start (imports before the loop runs)
    for name, rx in _WHOLE_STACK:
        if any(rx.search(f) for f in frames):
            return name
    for frame in reversed(frames):
        for name, rx in _INNERMOST_RX:
            if rx.search(frame):
                return name
    return "other"


def summarise(lines: Iterable[str]) -> Counter[str]:
    """Samples per category over a raw profile's lines (start-up left out)."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        category = categorise(stack.split(";"))
        if category is not None:
            counts[category] += int(count)
    return counts


def main(argv: list[str] | None = None) -> int:
    """Print a markdown table of the shares; ``argv``: the raw profile's path."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.profile_summary WORKER.raw", file=sys.stderr)
        return 2
    counts = summarise(Path(args[0]).read_text().splitlines())
    total = sum(counts.values())
    if not total:
        print("no samples outside start-up", file=sys.stderr)
        return 1
    print(f"{total} samples outside start-up\n")
    print("| where | share |\n| --- | ---: |")
    for name, count in counts.most_common():
        print(f"| {name} | {100 * count / total:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
