"""A sync held up by an outage is findable by search attribute and by `spicesync stuck`."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType

from starters.stuck import find_stuck, parse_duration
from starters.user_events import WaitFor, create_user
from tests.conftest import SpiceDBServer
from tests.integration.conftest import (
    Pipeline,
    assert_synced,
    eventually,
    local_steps,
    new_event,
)
from workflows.stages import ORG_ID, STAGE, USER_ID

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
        assert mine.stage == "writing_permissions" and mine.activity == "write_memberships"
        assert mine.last_error and "SpiceDB" in mine.last_error  # decoded through the codec
        # The same question as a saved view in the UI would ask it.
        query = f"SpicesyncUserId = '{user.user_id}' AND SpicesyncStage = 'writing_permissions'"
        assert [w.id async for w in pipeline.client.list_workflows(query)] == [started.workflow_id]
    finally:
        spicedb_server.resume()
    done = await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, user, done.zed_token or "")

    async def gone() -> bool:
        stuck = await find_stuck(pipeline.client, older_than=timedelta(0))
        return all(s.user_id != user.user_id for s in stuck)

    await eventually(gone, timeout=30)


async def test_a_row_insert_held_by_postgresql_is_listed_as_inserting_row(
    pipeline: Pipeline,
) -> None:
    user = new_event()
    async with pipeline.pool.acquire() as holder:
        # SHARE mode lets the sync read the users table but holds every insert into it.
        lock = holder.transaction()
        await lock.start()
        await holder.execute("LOCK TABLE users IN SHARE MODE")
        try:
            started = await create_user(
                user, wait=WaitFor.START, client=pipeline.client, task_queue=pipeline.task_queue
            )

            async def listed() -> bool:
                stuck = await find_stuck(pipeline.client, older_than=timedelta(seconds=1))
                return any(s.user_id == user.user_id for s in stuck)

            await eventually(listed, timeout=30)
            [mine] = [
                s
                for s in await find_stuck(pipeline.client, older_than=timedelta(0))
                if s.user_id == user.user_id
            ]
            assert mine.workflow_id == started.workflow_id
            assert (mine.stage, mine.activity) == ("inserting_row", "insert_created_row")
        finally:
            await lock.rollback()
    done = await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, user, done.zed_token or "")
    described = await pipeline.client.get_workflow_handle(done.workflow_id).describe()
    assert described.typed_search_attributes.get(STAGE) == "idle"


# A healthy created user's sync, counted from its real history: 3 upserts of 18 events, where
# before stage marks were kept for trouble it made 11 of 31 (its ids, then every stage it went
# through), before one release marker stood for every patch 6 of 27, before the SpiceDB write
# checked the predicted state itself and recorded the row (no step before or after it) 3 of 21,
# and before the insert read the new run's App DB state (no read step before it) 3 of 19. 1 of
# the 3 is the SDK's own: each patch a run asks upserts TemporalChangeVersion, and a run of this
# release asks one. The ids go with the start since release-2026-12-04b, so no upsert names them.
HEALTHY_CREATION_UPSERTS = 3
HEALTHY_CREATION_EVENTS = 18
SPICESYNC_UPSERTS = [
    # The event's first write runs as a normal activity (an update is not in history until a
    # workflow task records its acceptance): its stage is shown.
    {"SpicesyncStage": "inserting_row", "SpicesyncStageSince": ""},
    # Once the event is applied: back to idle.
    {"SpicesyncStage": "idle", "SpicesyncStageSince": ""},
]
# The same creation delivered with WaitFor.START (the deliver signal, in history before any
# worker sees it): its insert and its write run locally in the first workflow task, so neither
# a stage nor an activity task is recorded. 17 events and 2 workflow tasks before
# release-2026-12-04b (the insert a normal activity, its stage shown, the ids upserted).
SIGNALLED_CREATION_EVENTS = [
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
    EventType.EVENT_TYPE_MARKER_RECORDED,  # the release's patch marker
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,  # the SDK's TemporalChangeVersion
    EventType.EVENT_TYPE_MARKER_RECORDED,  # insert_created_row, a local activity
    EventType.EVENT_TYPE_MARKER_RECORDED,  # write_memberships, a local activity
    EventType.EVENT_TYPE_TIMER_STARTED,  # idle until the next event, or closing
]


async def test_a_healthy_creation_upserts_only_the_first_write(pipeline: Pipeline) -> None:
    user = new_event()
    done = await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, user, done.zed_token or "")
    handle = pipeline.client.get_workflow_handle(done.workflow_id)
    history = await handle.fetch_history()
    upserts = [
        e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]
    assert len(upserts) == HEALTHY_CREATION_UPSERTS
    assert len(history.events) <= HEALTHY_CREATION_EVENTS
    ours = [
        {name: _keyword(fields[name]) if "Since" not in name else "" for name in fields}
        for fields in upserts
        if "TemporalChangeVersion" not in fields
    ]
    assert ours == SPICESYNC_UPSERTS
    attributes = (await handle.describe()).typed_search_attributes
    assert attributes.get(USER_ID) == user.user_id
    assert attributes.get(ORG_ID) == user.org_id
    assert attributes.get(STAGE) == "idle"


async def test_a_signalled_creation_runs_in_one_workflow_task_and_is_findable(
    pipeline: Pipeline, patient_local_steps: None
) -> None:
    user = new_event()
    started = await create_user(
        user, wait=WaitFor.START, client=pipeline.client, task_queue=pipeline.task_queue
    )
    handle = pipeline.client.get_workflow_handle(started.workflow_id)

    async def waiting() -> bool:
        events = (await handle.fetch_history()).events
        return any(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in events)

    # Done and waiting for more before the duplicate below is sent, so that it cannot join the
    # first workflow task.
    await eventually(waiting, timeout=60)
    history = await handle.fetch_history()
    kinds = [e.event_type for e in history.events]
    assert kinds == SIGNALLED_CREATION_EVENTS
    # The same event again, waiting for its outcome: a duplicate, answered from the ledger.
    done = await create_user(user, client=pipeline.client, task_queue=pipeline.task_queue)
    await assert_synced(pipeline, user, done.zed_token or "")
    assert local_steps(history) == ["insert_created_row", "write_memberships"]
    # Found by the ids its start carried, with no upsert of its own.
    query = f"SpicesyncUserId = '{user.user_id}' AND SpicesyncOrgId = '{user.org_id}'"

    async def listed() -> bool:
        return [w.id async for w in pipeline.client.list_workflows(query)] == [handle.id]

    await eventually(listed, timeout=30)


def _keyword(payload: Payload) -> str:
    return str(json.loads(payload.data))
