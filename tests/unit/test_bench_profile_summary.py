"""The profile summary (bench/profile_summary.py) on stacks shaped like py-spy's raw output."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.profile_summary import main, summarise

_LOOP = (
    "<module> (spicesync/__main__.py:6);run (asyncio/runners.py:190);"
    "BaseEventLoop._run_once (asyncio/base_events.py:1922)"
)
_NEW_INSTANCE = (
    f"{_LOOP};_WorkflowWorker._create_workflow_instance (temporalio/worker/_workflow.py:746);"
    "<module> (workflows/user_sync.py:17);_find_and_load (<frozen importlib._bootstrap>:1176)"
)
# The activity's query below the tracing interceptor: the driver's work, not tracing's.
_QUERY = (
    f"{_LOOP};_TracingActivityInboundInterceptor.execute_activity "
    "(temporalio/contrib/opentelemetry/_interceptor.py:90);"
    "UserRowActivities.insert_created_row (activities/user_rows.py:50);"
    "Connection.fetchrow (asyncpg/connection.py:700)"
)
_SPAN = (
    f"{_LOOP};TracingInterceptor._start_as_current_span "
    "(temporalio/contrib/opentelemetry/_interceptor.py:200);"
    "Tracer.start_span (trace/__init__.py:1150)"
)
_EXPORT = (
    "_bootstrap (threading.py:1002);Thread.run (threading.py:982);"
    "BatchProcessor._export (_shared_internal/__init__.py:200);"
    "ReadableSpan.to_json (trace/__init__.py:500);dumps (json/__init__.py:238)"
)
_ENCRYPT = (
    f"{_LOOP};_WorkflowWorker._handle_activation (temporalio/worker/_workflow.py:420);"
    "EncryptionCodec.encode (spicesync/codec.py:90)"
)
_STARTUP = (
    f"{_LOOP};Worker.__init__ (temporalio/worker/_worker.py:300);"
    "load_default_build_id (temporalio/worker/_worker.py:900)"
)
_IMPORT_TIME = "<module> (spicesync/__main__.py:6);<module> (workers/worker.py:20)"


def test_samples_go_to_the_work_not_the_wrapper_and_start_up_is_left_out() -> None:
    lines = [
        f"{_NEW_INSTANCE} 30",
        f"{_QUERY} 5",
        f"{_SPAN} 4",
        f"{_EXPORT} 3",
        f"{_ENCRYPT} 2",
        f"{_STARTUP} 100",
        f"{_IMPORT_TIME} 50",
        "",
    ]
    counts = summarise(lines)
    assert counts == {
        "sandbox: new workflow instance (module re-import, restrictions)": 30,
        "asyncpg (PostgreSQL driver)": 5,
        "tracing: OpenTelemetry spans, context propagation": 4,
        "tracing: span export (BatchSpanProcessor thread: scrub, to_json, write)": 3,
        "encryption: AES-GCM codec": 2,
    }


def test_main_prints_shares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "worker.raw"
    raw.write_text(f"{_NEW_INSTANCE} 3\n{_ENCRYPT} 1\n{_STARTUP} 9\n")
    assert main([str(raw)]) == 0
    out = capsys.readouterr().out
    assert "4 samples outside start-up" in out
    assert "| sandbox: new workflow instance (module re-import, restrictions) | 75.0 % |" in out
    assert "| encryption: AES-GCM codec | 25.0 % |" in out
