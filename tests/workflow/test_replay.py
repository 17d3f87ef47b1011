"""Saved histories of real runs must replay against the current workflow code."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.create_user import CreateUserWorkflow

HISTORIES = Path(__file__).parent.parent / "histories"


@pytest.mark.parametrize("name", ["create_user_synced", "create_user_compensated"])
async def test_saved_history_replays(name: str) -> None:
    history = WorkflowHistory.from_json(name, (HISTORIES / f"{name}.json").read_text())
    result = await Replayer(
        workflows=[CreateUserWorkflow], data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


def test_histories_cover_both_outcomes() -> None:
    synced = (HISTORIES / "create_user_synced.json").read_text()
    compensated = (HISTORIES / "create_user_compensated.json").read_text()
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED" in synced
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_FAILED" in compensated
    assert "delete_user_row" in compensated
