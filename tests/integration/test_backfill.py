"""Backfill on the real engines: 20,000 pre-existing users brought into SpiceDB beside live
syncs, paced by durable timers, resumable across workers."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import ActivityEnvironment

from activities import backfill as backfill_activities
from activities.backfill import BackfillActivities
from activities.memberships import MembershipActivities
from spicesync.errors import MarkerMoved
from spicesync.models import (
    BackfillInput,
    BackfillPageInput,
    BackfillResult,
    CountUncheckedSyncsInput,
    Membership,
    MembershipsSnapshot,
    UserSyncInput,
    WriteMembershipsInput,
)
from spicesync.settings import Settings
from spicesync.spicedb import read_user_snapshot
from starters.backfill import start_backfill
from starters.user_events import change_role, move_user
from tests.integration.conftest import OwnStores, Pipeline, relationships_of
from tests.integration.test_reconcile import holds_role
from workers.worker import build_worker, open_resources
from workflows.backfill import BackfillWorkflow
from workflows.steps import CHECKED_WRITE_MARKERS
from workflows.user_sync import UserSyncWorkflow


async def seed(pool: asyncpg.Pool, count: int, orgs: int) -> list[tuple[str, str, str]]:
    """Rows an app had before spicesync: (user, org, role), never written to SpiceDB."""
    users = [
        (uuid.uuid4(), f"org-{i % orgs}", "admin" if i % 7 == 0 else "member") for i in range(count)
    ]
    await pool.copy_records_to_table(
        "users",
        records=[(u, f"pre-{u.hex[:12]}@example.com", "Pre", o, r) for u, o, r in users],
        columns=["id", "email", "name", "org_id", "role"],
    )
    return [(str(u), o, r) for u, o, r in users]


async def start(pipeline: Pipeline, request: BackfillInput) -> WorkflowHandle[Any, BackfillResult]:
    """Start a backfill of its own on the pipeline's queue (as ``spicesync backfill`` does)."""
    return await start_backfill(
        request,
        client=pipeline.client,
        task_queue=pipeline.task_queue,
        workflow_id=f"backfill-{uuid.uuid4()}",
    )


async def test_backfill_of_20000_users_beside_live_syncs(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    p = own_pipeline
    users = await seed(own_stores.pool, 20_000, orgs=500)
    changed = random.Random(5).sample(users, 50)

    handle = await start(p, BackfillInput(lanes=3))
    # Live role changes for some of the same users, while the backfill writes them.
    live = await asyncio.gather(
        *(
            change_role(
                u,
                org_id=o,
                role="admin" if r == "member" else "member",
                version=2,
                client=p.client,
                task_queue=p.task_queue,
            )
            for u, o, r in changed
        )
    )
    result = await handle.result()

    assert all(outcome.status == "synced" for outcome in live)
    progress = result.progress
    # Counted at the start: users a live sync had already written are not candidates.
    assert progress.done and 20_000 - len(changed) <= progress.total <= 20_000
    # A user a live sync wrote first is no longer a candidate (or is skipped under its lock).
    assert progress.written_users + progress.skipped == progress.scanned
    assert 20_000 - len(changed) <= progress.written_users <= 20_000
    assert result.rows_scanned_per_second > 0 and result.relationships_written_per_second > 0
    # Each changed user holds exactly the role of the live change: the backfill's older
    # membership never landed over it.
    for u, o, r in changed:
        assert await relationships_of(own_stores.spicedb, u) == [
            (o, "admin" if r == "member" else "member")
        ]
    changed_ids = {u for u, _, _ in changed}
    sample = random.Random(6).sample([x for x in users if x[0] not in changed_ids], 1000)
    assert all(await holds_role(own_stores.spicedb, sample))
    unsynced = await own_stores.pool.fetchval(
        "SELECT count(*) FROM users WHERE sync_status <> 'synced' OR permissions_written_at IS NULL"
    )
    assert unsynced == 0

    again = await start(p, BackfillInput())
    assert (await again.result()).progress.written_users == 0  # nothing left to do


async def test_backfill_is_paced_by_timers_and_resumes_on_another_worker(
    client: Client, task_queue: str, own_stores: OwnStores
) -> None:
    users = await seed(own_stores.pool, 1_000, orgs=10)
    settings = Settings(
        database_url=own_stores.database_url,
        spicedb_endpoint=own_stores.server.endpoint,
        spicedb_preshared_key=own_stores.server.preshared_key,
    )
    workflow_id = f"backfill-{uuid.uuid4()}"
    async with open_resources(settings) as resources:
        async with build_worker(client, resources, task_queue=task_queue):
            handle = await start_backfill(
                BackfillInput(batch_size=100, max_rate=500.0),
                client=client,
                task_queue=task_queue,
                workflow_id=workflow_id,
            )
            while (await handle.query(BackfillWorkflow.progress)).written_users < 200:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # The first worker is gone mid-backfill; starting the backfill again joins the same
        # run, and a new worker carries it on from its cursor.
        rejoined = await start_backfill(
            BackfillInput(), client=client, task_queue=task_queue, workflow_id=workflow_id
        )
        assert rejoined.result_run_id == handle.result_run_id
        async with build_worker(client, resources, task_queue=task_queue):
            result = await rejoined.result()
    assert result.progress.written_users == 1_000 and result.progress.skipped == 0
    timers = [
        e
        async for e in handle.fetch_history_events()
        if e.HasField("timer_started_event_attributes")
    ]
    assert timers  # paced by durable timers, not by sleeping in an activity
    assert all(await holds_role(own_stores.spicedb, users))


async def test_a_live_write_that_meets_a_backfilled_marker_re_plans(
    own_stores: OwnStores,
) -> None:
    [(user_id, org, _)] = await seed(own_stores.pool, 1, orgs=1)
    activities = MembershipActivities(own_stores.spicedb, own_stores.pool)
    env = ActivityEnvironment()
    membership = Membership(user_id=user_id, org_id=org, role="member")
    # The backfill wrote version 1 after the live sync read "no marker".
    await env.run(
        activities.write_memberships,
        WriteMembershipsInput(
            user_id=user_id,
            remove=[],
            add=[membership],
            expected_marker=None,
            set_marker=1,
            remove_marker=None,
            check_marker=False,
        ),
    )
    with pytest.raises(MarkerMoved):
        await env.run(
            activities.write_memberships,
            WriteMembershipsInput(
                user_id=user_id,
                remove=[],
                add=[membership.model_copy(update={"role": "admin"})],
                expected_marker=None,
                set_marker=2,
                remove_marker=None,
            ),
        )
    assert await relationships_of(own_stores.spicedb, user_id) == [(org, "member")]


async def test_a_lane_ends_with_its_last_full_page(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    """Exactly three full pages: three batches, not a fourth, empty one to find the end."""
    users = await seed(own_stores.pool, 300, orgs=3)
    handle = await start(own_pipeline, BackfillInput(batch_size=100))
    result = await handle.result()
    assert result.progress.done and result.progress.written_users == 300
    batches = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        async for e in handle.fetch_history_events()
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert batches.count("backfill_batch") == 3, batches
    assert all(await holds_role(own_stores.spicedb, users))


async def _activities_of(handle: WorkflowHandle[Any, Any]) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        async for e in handle.fetch_history_events()
        if e.HasField("activity_task_scheduled_event_attributes")
    ]


def _snapshot(user_id: str, org: str, role: str, *, marker: int | None) -> MembershipsSnapshot:
    return MembershipsSnapshot(
        memberships=[Membership(user_id=user_id, org_id=org, role=role)], marker=marker
    )


async def test_beside_checked_syncs_the_backfill_writes_no_version_markers(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    """Every sync that may run checks SpiceDB under the row's lock: one relationship per user,
    and a later event of a backfilled user still replaces its membership exactly."""
    users = await seed(own_stores.pool, 200, orgs=4)
    handle = await start(own_pipeline, BackfillInput(batch_size=100))
    result = await handle.result()
    assert result.progress.written_users == 200 and not result.progress.version_markers
    assert result.progress.relationships_written == 200
    assert "count_unchecked_syncs" in await _activities_of(handle)
    assert all(await holds_role(own_stores.spicedb, users))
    (user_id, org, role), *_ = users
    assert await read_user_snapshot(own_stores.spicedb, user_id) == _snapshot(
        user_id, org, role, marker=None
    )
    # The user's next event predicted a marker the backfill did not write: it plans from what
    # SpiceDB holds, and the move leaves the new org's membership alone.
    moved = await move_user(
        user_id,
        org_id="org-elsewhere",
        role="admin",
        version=2,
        client=own_pipeline.client,
        task_queue=own_pipeline.task_queue,
    )
    assert moved.status == "synced"
    assert await relationships_of(own_stores.spicedb, user_id) == [("org-elsewhere", "admin")]
    assert (await read_user_snapshot(own_stores.spicedb, user_id)).marker == 2


async def _earlier_release_run(client: Client, queue: str) -> WorkflowHandle[Any, Any]:
    """A user sync with no checked-write marker, as one begun by an earlier release is (here its
    first task is delayed, so no worker touches it), once visibility shows it running."""
    old = await client.start_workflow(
        UserSyncWorkflow.run,
        UserSyncInput(user_id=str(uuid.uuid4())),
        id=f"earlier-release-{uuid.uuid4()}",
        task_queue=queue,
        start_delay=timedelta(hours=1),
    )
    seen = f"WorkflowId = '{old.id}' AND ExecutionStatus = 'Running'"
    for _ in range(100):  # visibility lags the start by a moment
        if (await client.count_workflows(seen)).count:
            break
        await asyncio.sleep(0.1)
    return old


async def test_unchecked_syncs_are_counted_once_past_their_first_task_grace(
    client: Client, task_queue: str, own_stores: OwnStores, monkeypatch: pytest.MonkeyPatch
) -> None:
    activities = BackfillActivities(own_stores.pool, own_stores.spicedb, client)
    request = CountUncheckedSyncsInput(
        task_queue=task_queue, checked_markers=sorted(CHECKED_WRITE_MARKERS)
    )
    old = await _earlier_release_run(client, task_queue)
    try:
        env = ActivityEnvironment()
        # Just begun: taken for this release's run whose first task has not run yet.
        assert await env.run(activities.count_unchecked_syncs, request) == 0
        monkeypatch.setattr(backfill_activities, "YOUNG_RUN_GRACE", timedelta(0))
        assert await env.run(activities.count_unchecked_syncs, request) == 1
        other_queue = request.model_copy(update={"task_queue": f"{task_queue}-other"})
        assert await env.run(activities.count_unchecked_syncs, other_queue) == 0
    finally:
        await old.terminate()


async def test_a_running_sync_of_an_earlier_release_keeps_the_version_markers(
    own_pipeline: Pipeline, own_stores: OwnStores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such a sync may write after reading SpiceDB outside the row's lock: the backfill writes
    each user's marker for it to meet."""
    client, queue = own_pipeline.client, own_pipeline.task_queue
    monkeypatch.setattr(backfill_activities, "YOUNG_RUN_GRACE", timedelta(0))
    old = await _earlier_release_run(client, queue)
    try:
        users = await seed(own_stores.pool, 50, orgs=2)
        result = await (await start(own_pipeline, BackfillInput())).result()
    finally:
        await old.terminate()
    assert result.progress.version_markers and result.progress.relationships_written == 100
    assert all(await holds_role(own_stores.spicedb, users))
    (user_id, org, role), *_ = users
    assert await read_user_snapshot(own_stores.spicedb, user_id) == _snapshot(
        user_id, org, role, marker=1
    )


async def test_a_batch_with_version_markers_holds_half_as_many_users(
    client: Client, own_stores: OwnStores
) -> None:
    """SpiceDB takes 1,000 updates a write: 1,000 users without markers, 500 with them."""
    await seed(own_stores.pool, 1_600, orgs=4)
    activities = BackfillActivities(own_stores.pool, own_stores.spicedb, client)
    env = ActivityEnvironment()
    page = BackfillPageInput(after_user_id=None, batch_size=1_000, request_id="batch-test")
    marked = await env.run(activities.backfill_batch, page)
    assert (marked.written_users, marked.relationships_written) == (500, 1_000)
    assert marked.next is not None
    unmarked = await env.run(
        activities.backfill_batch,
        page.model_copy(update={"after_user_id": marked.next, "version_markers": False}),
    )
    assert (unmarked.written_users, unmarked.relationships_written) == (1_000, 1_000)
    assert unmarked.next is not None
