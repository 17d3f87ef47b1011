"""Saved histories of real runs must replay against the current workflow code."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.user_sync import UserSyncWorkflow

HISTORIES = Path(__file__).parent.parent / "histories"


@pytest.mark.parametrize("name", ["user_sync_lifecycle", "user_sync_compensated"])
async def test_saved_history_replays(name: str) -> None:
    history = WorkflowHistory.from_json(name, (HISTORIES / f"{name}.json").read_text())
    result = await Replayer(
        workflows=[UserSyncWorkflow], data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None


def test_histories_cover_the_lifecycle_and_compensation() -> None:
    lifecycle = (HISTORIES / "user_sync_lifecycle.json").read_text()
    compensated = (HISTORIES / "user_sync_compensated.json").read_text()
    assert lifecycle.count('"name": "apply_row"') == 4  # created, role_changed, moved, deleted
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED" in lifecycle
    assert '"name": "insert_created_row"' in compensated
