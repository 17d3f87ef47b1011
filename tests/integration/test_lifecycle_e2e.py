"""User lifecycle events on the real engines: order, idempotency, exact compensation."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from typing import Any

import pytest
from authzed.api.v1 import WatchRequest
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import ActivityEnvironment

from activities.memberships import MembershipActivities
from spicesync.constants import user_workflow_id
from spicesync.errors import SupersededWrite
from spicesync.models import Membership, UserEvent, WriteMembershipsInput
from starters.user_events import (
    UserSyncFailed,
    WaitFor,
    change_role,
    create_user,
    delete_user,
    move_user,
    submit_event,
)
from tests.integration.conftest import (
    Faults,
    Pipeline,
    assert_neither,
    assert_synced,
    grant_outside_spicesync,
    new_event,
    relationships_of,
    user_row,
)

pytestmark = pytest.mark.integration


def queue(p: Pipeline) -> dict[str, Any]:
    return {"client": p.client, "task_queue": p.task_queue}


async def test_role_change_and_move_rewrite_spicedb_atomically(pipeline: Pipeline) -> None:
    user = new_event()
    created = await create_user(user, **queue(pipeline))
    promoted = await change_role(
        user.user_id, org_id=user.org_id, role="admin", version=2, **queue(pipeline)
    )
    assert promoted.zed_token and promoted.zed_token != created.zed_token  # the token advances
    await assert_synced(pipeline, user.model_copy(update={"role": "admin"}), promoted.zed_token)

    moved = await move_user(
        user.user_id, org_id=f"{user.org_id}-b", role="member", version=3, **queue(pipeline)
    )
    after = user.model_copy(update={"org_id": f"{user.org_id}-b", "role": "member"})
    assert moved.zed_token
    await assert_synced(pipeline, after, moved.zed_token)  # exactly one membership: the new one
    row = await user_row(pipeline.pool, user.user_id)
    assert row is not None and row["version"] == 3


async def test_create_then_delete_within_milliseconds_ends_with_neither(pipeline: Pipeline) -> None:
    user = new_event()
    outcomes = await asyncio.gather(
        create_user(user, wait=WaitFor.START, **queue(pipeline)),
        delete_user(user.user_id, version=2, wait=WaitFor.START, **queue(pipeline)),
    )
    assert {o.status for o in outcomes} <= {"started", "stale"}
    final = await delete_user(user.user_id, version=2, **queue(pipeline))  # duplicate: waits for it
    assert final.status == "synced"
    await assert_neither(pipeline, user)
    tombstone = await pipeline.pool.fetchval(
        "SELECT version FROM user_tombstones WHERE id = $1", uuid.UUID(user.user_id)
    )
    assert tombstone == 2
    # A create delivered late (a retry from the app) is stale, not a resurrection.
    late = await create_user(user, **queue(pipeline))
    # The same event id reports its first outcome: synced if it ran before the delete, stale if
    # the delete overtook it.
    assert late.status in {"synced", "stale"}
    replay = await create_user(user, event_id="late-retry", **queue(pipeline))
    assert replay.status == "stale"
    await assert_neither(pipeline, user)


async def test_fifty_shuffled_events_with_duplicates_end_at_the_highest_version(
    pipeline: Pipeline,
) -> None:
    user = new_event()
    uid, rng = user.user_id, random.Random(7)
    orgs = [f"{user.org_id}-{i % 4}" for i in range(51)]
    events = [
        UserEvent(
            event_id=f"{uid}:created:v1",
            user_id=uid,
            version=1,
            kind="created",
            org_id=orgs[1],
            role="member",
            email=user.email,
            name=user.name,
        )
    ] + [
        UserEvent(
            event_id=f"{uid}:change:v{v}",
            user_id=uid,
            version=v,
            kind=rng.choice(["role_changed", "moved"]),
            org_id=orgs[v],
            role=rng.choice(["member", "admin"]),
        )
        for v in range(2, 51)
    ]
    deliveries = events + rng.sample(events, 15)
    rng.shuffle(deliveries)

    tags: Counter[str] = Counter()

    async def watch() -> None:
        async for response in pipeline.spicedb.Watch(
            WatchRequest(optional_object_types=["organization"])
        ):
            metadata = dict(response.optional_transaction_metadata.items())
            if str(metadata.get("workflow_id")) == user_workflow_id(uid) and response.updates:
                tags[str(metadata["event_id"])] += 1

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    try:
        outcomes = await asyncio.gather(
            *(submit_event(e, **queue(pipeline)) for e in deliveries), return_exceptions=True
        )
        await asyncio.sleep(0.5)  # let Watch deliver the last writes
    finally:
        watcher.cancel()
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    last = events[-1]
    final_token = next(o.zed_token for o in outcomes if o.event_id == last.event_id)  # type: ignore[union-attr]
    expected = user.model_copy(update={"org_id": last.org_id, "role": last.role})
    await assert_synced(pipeline, expected, final_token)
    row = await user_row(pipeline.pool, uid)
    assert row is not None and row["version"] == 50
    # Each event id wrote SpiceDB at most once; the highest always did.
    assert tags and max(tags.values()) == 1
    assert tags[last.event_id] == 1
    # Every delivery of one event id got the same answer.
    by_id: dict[str, set[str]] = {}
    for o in outcomes:
        by_id.setdefault(o.event_id, set()).add(o.status)  # type: ignore[union-attr]
    assert all(len(statuses) == 1 for statuses in by_id.values())


async def test_rollback_keeps_a_grant_that_existed_before(
    pipeline: Pipeline, faults: Faults
) -> None:
    """SpiceDB issue #1903: compensation must not delete a relationship it did not create."""
    user = new_event()
    grant = Membership(user_id=user.user_id, org_id=user.org_id, role=user.role)
    await grant_outside_spicesync(pipeline.spicedb, grant)
    # The row's last statement (storing the ZedToken, after SpiceDB accepted the write) fails
    # for good: a trigger's check violation. The row rolls back; SpiceDB is restored exactly.
    await faults.inject(user.user_id, "UPDATE", "23514")
    with pytest.raises(UserSyncFailed) as caught:
        await create_user(user, **queue(pipeline))
    assert caught.value.error_type == "AppDBRejectedAfterWrite"
    assert await user_row(pipeline.pool, user.user_id) is None  # the row it inserted is gone
    assert await relationships_of(pipeline.spicedb, user.user_id) == [(user.org_id, user.role)]


async def test_a_new_users_row_refused_after_its_write_leaves_neither_store(
    pipeline: Pipeline, faults: Faults
) -> None:
    """A new user's write is checked against "SpiceDB holds nothing" inside the write itself
    (no read first); the row's ZedToken, stored after SpiceDB accepted, is refused for good:
    the membership the write made is revoked and the row removed."""
    user = new_event()
    await faults.inject(user.user_id, "UPDATE", "23514")
    with pytest.raises(UserSyncFailed) as caught:
        await create_user(user, **queue(pipeline))
    assert caught.value.error_type == "AppDBRejectedAfterWrite"
    assert await user_row(pipeline.pool, user.user_id) is None
    assert await relationships_of(pipeline.spicedb, user.user_id) == []


async def test_a_refused_row_delete_revokes_nothing(pipeline: Pipeline, faults: Faults) -> None:
    """The row's delete runs in the write's transaction before SpiceDB is called: refused,
    it leaves both stores as they were (nothing revoked, nothing to restore)."""
    user = new_event(role="admin")
    await create_user(user, **queue(pipeline))
    await faults.inject(user.user_id, "DELETE", "23503")  # a foreign key blocks the delete
    with pytest.raises(UserSyncFailed) as caught:
        await delete_user(user.user_id, version=2, **queue(pipeline))
    assert caught.value.error_type == "AppDBRejected"
    assert await relationships_of(pipeline.spicedb, user.user_id) == [(user.org_id, "admin")]
    row = await user_row(pipeline.pool, user.user_id)
    assert row is not None and row["version"] == 1
    # Fixed, the same user can be deleted with a newer event: revoke first, then the row.
    await faults.clear(user.user_id)
    await delete_user(user.user_id, version=3, **queue(pipeline))
    await assert_neither(pipeline, user)


async def test_a_retried_add_cannot_land_after_a_later_remove(pipeline: Pipeline) -> None:
    """SpiceDB issue #1503: an old write attempt that wakes up late must not resurrect."""
    user = new_event()
    await create_user(user, **queue(pipeline))  # marker v1
    await change_role(user.user_id, org_id=user.org_id, role="admin", version=2, **queue(pipeline))
    await delete_user(user.user_id, version=3, **queue(pipeline))
    # The v2 write, replayed as a zombie attempt would send it (expecting marker v1).
    zombie = WriteMembershipsInput(
        user_id=user.user_id,
        remove=[Membership(user_id=user.user_id, org_id=user.org_id, role="member")],
        add=[Membership(user_id=user.user_id, org_id=user.org_id, role="admin")],
        expected_marker=1,
        remove_marker=1,
        set_marker=2,
        event_id=f"{user.user_id}:role_changed:v2",
    )
    with pytest.raises(SupersededWrite):
        await ActivityEnvironment().run(
            MembershipActivities(pipeline.spicedb, pipeline.pool).write_memberships, zombie
        )
    assert await relationships_of(pipeline.spicedb, user.user_id) == []


async def test_a_stuck_user_blocks_nobody_else(pipeline: Pipeline, faults: Faults) -> None:
    stuck = new_event()
    # A transient error (serialization failure) on every insert of this user: retried forever.
    await faults.inject(stuck.user_id, "INSERT", "40001")
    stuck_start = await create_user(stuck, wait=WaitFor.START, **queue(pipeline))
    others = [new_event() for _ in range(200)]
    gate = asyncio.Semaphore(50)

    async def create(u: Any) -> Any:
        async with gate:
            return await create_user(u, **queue(pipeline))

    results = await asyncio.gather(*(create(u) for u in others))
    assert all(r.status == "synced" for r in results)
    synced = await pipeline.pool.fetchval(
        "SELECT count(*) FROM users WHERE id = ANY($1::uuid[]) AND sync_status = 'synced'",
        [uuid.UUID(u.user_id) for u in others],
    )
    assert synced == 200
    described = await pipeline.client.get_workflow_handle(stuck_start.workflow_id).describe()
    assert described.status == WorkflowExecutionStatus.RUNNING
    pending = described.raw_description.pending_activities
    assert (
        pending
        and pending[0].activity_type.name == "insert_created_row"
        and pending[0].attempt >= 2
    )
    # Once the fault is fixed, the stuck user completes by itself.
    await faults.clear(stuck.user_id)
    done = await create_user(stuck, **queue(pipeline))
    await assert_synced(pipeline, stuck, done.zed_token or "")
