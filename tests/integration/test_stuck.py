"""A sync held up by an outage is findable by search attribute and by `spicesync stuck`."""

from __future__ import annotations

from datetime import timedelta

import pytest

from starters.stuck import find_stuck, parse_duration
from starters.user_events import WaitFor, create_user
from tests.conftest import SpiceDBServer
from tests.integration.conftest import Pipeline, assert_synced, eventually, new_event

pytestmark = pytest.mark.integration


def test_durations() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("5m") == timedelta(minutes=5)
    assert parse_duration("2h") == timedelta(hours=2)
    with pytest.raises(ValueError):
        parse_duration("soon")


async def test_a_sync_held_by_spicedb_is_listed_then_completes(
    pipeline: Pipeline, spicedb_server: SpiceDBServer
) -> None:
    user = new_event()
    spicedb_server.pause()
    try:
        started = await create_user(
            user, wait=WaitFor.START, client=pipeline.client, task_queue=pipeline.task_queue
        )

        async def listed() -> bool:
            stuck = await find_stuck(pipeline.client, older_than=timedelta(seconds=1))
            mine = [s for s in stuck if s.user_id == user.user_id]
            return bool(mine) and mine[0].attempt >= 2

        await eventually(listed, timeout=60)
        [mine] = [
            s
            for s in await find_stuck(pipeline.client, older_than=timedelta(0))
            if s.user_id == user.user_id
        ]
        assert mine.workflow_id == started.workflow_id
        assert mine.stage == "reading_permissions" and mine.activity == "read_memberships"
        assert mine.last_error and "SpiceDB" in mine.last_error  # decoded through the codec
        # The same question as a saved view in the UI would ask it.
        query = f"SpicesyncUserId = '{user.user_id}' AND SpicesyncStage = 'reading_permissions'"
        assert [w.id async for w in pipeline.client.list_workflows(query)] == [started.workflow_id]
    finally:
        spicedb_server.resume()
    done = await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, user, done.zed_token or "")

    async def gone() -> bool:
        stuck = await find_stuck(pipeline.client, older_than=timedelta(0))
        return all(s.user_id != user.user_id for s in stuck)

    await eventually(gone, timeout=30)
