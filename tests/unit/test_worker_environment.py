"""The environment the benchmark and the fault suite give the worker processes they start."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from spicesync.codec import generate_key
from spicesync.constants import ACTIVITY_START_TO_CLOSE
from spicesync.settings import Settings, load_settings
from workers.worker import worker_tuning


def test_a_worker_gets_exactly_the_given_engines_and_the_callers_tuning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://caller/db")
    monkeypatch.setenv("SPICESYNC_TASK_QUEUE", "callers-queue")
    monkeypatch.setenv("SPICESYNC_WORKER_MAX_CACHED_WORKFLOWS", "5000")
    keys = f"k1:{generate_key()}"
    settings = Settings(
        temporal_address="127.0.0.1:7999", encryption_keys=SecretStr(keys), _env_file=None
    )
    env = settings.worker_environment(
        task_queue="q", database_url="postgresql://own/db", spicedb_endpoint="e:1", spicedb_key="s"
    )
    assert env["DATABASE_URL"] == "postgresql://own/db"
    assert env["SPICESYNC_TASK_QUEUE"] == "q"
    assert env["TEMPORAL_ADDRESS"] == "127.0.0.1:7999"
    assert env["SPICESYNC_ENCRYPTION_KEYS"] == keys
    assert env["SPICESYNC_WORKER_MAX_CACHED_WORKFLOWS"] == "5000"


def test_worker_tuning_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPICESYNC_WORKER_WORKFLOW_TASK_POLLERS", "10")
    settings = Settings(_env_file=None)
    assert settings.worker_workflow_task_pollers == 10
    assert settings.worker_max_cached_workflows is None  # the SDK's default


def test_started_workers_serve_no_health_port_and_drain_briefly() -> None:
    """Many workers on one box must not fight over the default health port, and their stop
    helpers SIGKILL after 10-15 s: the grace stays below that."""
    env = Settings(_env_file=None).worker_environment(
        task_queue="q", database_url="postgresql://own/db", spicedb_endpoint="e:1", spicedb_key="s"
    )
    assert env["SPICESYNC_HEALTH_ADDRESS"] == ""
    assert float(env["SPICESYNC_SHUTDOWN_GRACE_SECONDS"]) < 10


def test_the_default_grace_outlasts_an_activity_attempt() -> None:
    assert Settings(_env_file=None).shutdown_grace_seconds > ACTIVITY_START_TO_CLOSE


def test_production_writes_no_trace_file_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's root filesystem is read-only: production writes nothing into the state
    directory by default (traces go to OTLP, or to SPICESYNC_TRACE_FILE when set)."""
    production = {
        "environment": "production",
        "database_url": "postgresql://db/app?sslmode=verify-full",
        "spicedb_endpoint": "spicedb:50051",
        "spicedb_insecure": False,
        "spicedb_preshared_key": SecretStr("k" * 32),
        "encryption_keys": SecretStr(f"k1:{generate_key()}"),
        "_env_file": None,
    }
    assert Settings(**production).trace_path() is None
    assert Settings(**production, trace_file="/t.jsonl").trace_path() == Path("/t.jsonl")
    assert Settings(_env_file=None).trace_path() == Path(".spicesync/logs/traces.jsonl")


def test_a_state_folder_it_may_not_enter_reads_as_no_stack_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod's or a service's state folder owned by someone else made every command die with a
    PermissionError traceback before reading any setting."""
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("SPICESYNC_STATE_DIR", str(state))
    real_is_file = Path.is_file

    def is_file(self: Path) -> bool:
        if self.parent == state:  # root may enter any folder: refuse as the kernel would
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    assert load_settings().state_dir == state


def test_worker_tuning_reaches_the_sdk_worker_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPICESYNC_WORKER_STICKY_QUEUE_SECONDS", "45")
    monkeypatch.setenv("SPICESYNC_WORKER_MAX_CONCURRENT_ACTIVITIES", "64")
    tuning = worker_tuning(Settings(_env_file=None))
    assert tuning["sticky_queue_schedule_to_start_timeout"] == timedelta(seconds=45)
    assert tuning["max_concurrent_activities"] == tuning["max_concurrent_local_activities"] == 64
    assert "max_cached_workflows" not in tuning  # unset: the SDK's default
    assert worker_tuning(None) == {}
    monkeypatch.delenv("SPICESYNC_WORKER_STICKY_QUEUE_SECONDS")
    # Not the SDK's 10 s, under which an overloaded worker's backlog turned into replays.
    default = worker_tuning(Settings(_env_file=None))["sticky_queue_schedule_to_start_timeout"]
    assert default == timedelta(seconds=60)
    # Not the SDK's 100, which let an overloaded worker's local steps overrun their budget.
    assert worker_tuning(Settings(_env_file=None))["max_concurrent_workflow_tasks"] == 10
