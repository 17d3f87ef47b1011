"""``SPICESYNC_WORKFLOW_SANDBOX`` reaches the worker that ``build_worker`` makes."""

from __future__ import annotations

from typing import cast

import asyncpg
import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient
from workers.worker import WorkerResources, build_worker

# build_worker only hands these to the activities' constructors; nothing here runs an activity.
_RESOURCES = WorkerResources(
    pool=cast(asyncpg.Pool, object()), spicedb=cast(SpiceDBClient, object())
)


@pytest.mark.parametrize(
    ("value", "runner"),
    [
        (None, SandboxedWorkflowRunner),
        ("true", SandboxedWorkflowRunner),
        ("false", UnsandboxedWorkflowRunner),
        ("0", UnsandboxedWorkflowRunner),
    ],
)
async def test_the_setting_chooses_the_workers_workflow_runner(
    time_skipping_env: WorkflowEnvironment,
    monkeypatch: pytest.MonkeyPatch,
    task_queue: str,
    value: str | None,
    runner: type,
) -> None:
    if value is None:
        monkeypatch.delenv("SPICESYNC_WORKFLOW_SANDBOX", raising=False)
    else:
        monkeypatch.setenv("SPICESYNC_WORKFLOW_SANDBOX", value)
    settings = Settings(_env_file=None)
    worker = build_worker(
        time_skipping_env.client, _RESOURCES, task_queue=task_queue, settings=settings
    )
    # The SDK's own default (SandboxedWorkflowRunner) when on: nothing of ours in between.
    assert type(worker.config()["workflow_runner"]) is runner


async def test_without_settings_workflows_stay_sandboxed(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    worker = build_worker(time_skipping_env.client, _RESOURCES, task_queue=task_queue)
    assert type(worker.config()["workflow_runner"]) is SandboxedWorkflowRunner


def test_bench_and_fault_suite_workers_inherit_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPICESYNC_WORKFLOW_SANDBOX", "false")
    env = Settings(_env_file=None).worker_environment(
        task_queue="q", database_url="postgresql://own/db", spicedb_endpoint="e:1", spicedb_key="s"
    )
    assert env["SPICESYNC_WORKFLOW_SANDBOX"] == "false"
