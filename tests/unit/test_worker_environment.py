"""The environment the benchmark and the fault suite give the worker processes they start."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from spicesync.codec import generate_key
from spicesync.settings import Settings


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
