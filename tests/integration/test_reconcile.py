"""Reconciliation on the real engines: each kind of drift found and repaired, dry runs change
nothing, SpiceDB data loss recovered, the prune cap holds, a repair never fights a live sync."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from authzed.api.v1 import (
    Consistency,
    ObjectReference,
    ReadRelationshipsRequest,
    Relationship,
    RelationshipFilter,
    RelationshipUpdate,
    SubjectReference,
    WriteRelationshipsRequest,
)

from spicesync.models import Membership, ReconcileInput, ReconcileReport
from spicesync.spicedb import (
    SpiceDBClient,
    holds_memberships,
    load_schema,
    membership_relationship,
    write_schema,
)
from spicesync.stack.processes import stop_pid
from starters.reconcile import start_reconcile
from starters.user_events import change_role, create_user
from tests.conftest import launch_spicedb
from tests.integration.conftest import OwnStores, Pipeline, new_event, relationships_of, revoke_all

_TOUCH = RelationshipUpdate.Operation.OPERATION_TOUCH


async def reconcile(pipeline: Pipeline, **options: object) -> ReconcileReport:
    handle = await start_reconcile(
        ReconcileInput.model_validate(options),
        client=pipeline.client,
        task_queue=pipeline.task_queue,
        workflow_id=f"reconcile-{uuid.uuid4()}",
    )
    return await handle.result()


async def everything(spicedb: SpiceDBClient) -> list[tuple[str, str, str]]:
    """Every organization relationship, sorted: the observable state of SpiceDB."""
    found = [
        (
            r.relationship.resource.object_id,
            r.relationship.relation,
            r.relationship.subject.object.object_id,
        )
        async for r in spicedb.ReadRelationships(
            ReadRelationshipsRequest(
                consistency=Consistency(fully_consistent=True),
                relationship_filter=RelationshipFilter(resource_type="organization"),
            )
        )
    ]
    return sorted(found)


async def rows(pool: asyncpg.Pool) -> list[tuple[str, str, str, str]]:
    return sorted(
        (str(r["id"]), r["org_id"], r["role"], r["sync_status"])
        for r in await pool.fetch("SELECT id, org_id, role, sync_status FROM users")
    )


async def touch(spicedb: SpiceDBClient, *memberships: Membership) -> None:
    await spicedb.WriteRelationships(
        WriteRelationshipsRequest(
            updates=[
                RelationshipUpdate(operation=_TOUCH, relationship=membership_relationship(m))
                for m in memberships
            ]
        )
    )


async def insert_unsynced(pool: asyncpg.Pool, count: int, org_id: str) -> list[str]:
    """Rows as an app had them before spicesync: no relationships ever written."""
    ids = [uuid.uuid4() for _ in range(count)]
    await pool.copy_records_to_table(
        "users",
        records=[(i, f"pre-{i.hex[:10]}@example.com", "Pre", org_id, "member") for i in ids],
        columns=["id", "email", "name", "org_id", "role"],
    )
    return [str(i) for i in ids]


async def holds_role(spicedb: SpiceDBClient, users: list[tuple[str, str, str]]) -> list[bool]:
    """CheckBulkPermissions: does each (user, org, role) hold, fully consistently?"""
    return await holds_memberships(
        spicedb, [Membership(user_id=u, org_id=o, role=r) for u, o, r in users]
    )


async def test_each_kind_of_drift_is_found_and_repaired_and_a_dry_run_changes_nothing(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    p, spicedb, pool = own_pipeline, own_stores.spicedb, own_stores.pool
    users = [new_event() for _ in range(6)]
    await asyncio.gather(*(create_user(u, client=p.client, task_queue=p.task_queue) for u in users))
    lost, role_fixed, extra_org, deleted_by_hand, healthy, _ = users
    # missing: SpiceDB lost a user's membership
    await revoke_all(spicedb, lost.user_id)
    # mismatched role: someone fixed the role in the App DB by hand
    await pool.execute(
        "UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(role_fixed.user_id)
    )
    # mismatched organization: a stray grant in another organization
    await touch(spicedb, Membership(user_id=extra_org.user_id, org_id="stray-org", role="admin"))
    # orphans: a row deleted by hand, a user that never existed, an id no event could carry
    await pool.execute("DELETE FROM users WHERE id = $1", uuid.UUID(deleted_by_hand.user_id))
    ghost = str(uuid.uuid4())
    await touch(
        spicedb,
        Membership(user_id=ghost, org_id="ghost-org", role="member"),
        Membership(user_id="legacy-42", org_id="ghost-org", role="admin"),
    )
    # unsynced: a row the app had before spicesync existed (the backfill's business)
    [unsynced] = await insert_unsynced(pool, 1, "old-org")

    before = (await everything(spicedb), await rows(pool))
    dry = await reconcile(p, dry_run=True)
    assert (await everything(spicedb), await rows(pool)) == before
    assert dry.dry_run and dry.repairs.repaired == 0
    assert (dry.found.missing, dry.found.mismatched, dry.found.orphan) == (1, 2, 3)
    assert dry.found.unsynced == 1 and dry.found.total() == 7
    assert dry.samples["missing"] == [lost.user_id] and dry.samples["unsynced"] == [unsynced]
    assert "spicesync backfill" in dry.message and "dry run" not in dry.message
    assert set(dry.samples["mismatched"]) == {role_fixed.user_id, extra_org.user_id}
    assert set(dry.samples["orphan"]) == {deleted_by_hand.user_id, ghost, "legacy-42"}
    assert dry.rows_scanned == 6 and dry.relationships_scanned > 0
    stored = await pool.fetchval("SELECT count(*) FROM reconcile_reports WHERE dry_run")
    assert stored == 1

    applied = await reconcile(p, dry_run=False)
    assert (applied.found.missing, applied.found.mismatched, applied.found.orphan) == (1, 2, 3)
    assert applied.found.unsynced == 1
    assert applied.repairs.repaired == 7 and applied.repairs.failed == 0
    assert not applied.prune_cap_exceeded
    assert await relationships_of(spicedb, lost.user_id) == [(lost.org_id, lost.role)]
    assert await relationships_of(spicedb, role_fixed.user_id) == [(role_fixed.org_id, "admin")]
    assert await relationships_of(spicedb, extra_org.user_id) == [(extra_org.org_id, "member")]
    assert await relationships_of(spicedb, deleted_by_hand.user_id) == []
    assert await relationships_of(spicedb, ghost) == []
    assert await relationships_of(spicedb, "legacy-42") == []
    assert await relationships_of(spicedb, healthy.user_id) == [(healthy.org_id, "member")]
    assert await relationships_of(spicedb, unsynced) == [("old-org", "member")]
    # the repaired rows carry the repair's ZedToken, like a live sync's
    row = await pool.fetchrow(
        "SELECT sync_status, zed_token FROM users WHERE id = $1", uuid.UUID(unsynced)
    )
    assert row["sync_status"] == "synced" and row["zed_token"]

    again = await reconcile(p, dry_run=True)
    assert again.found.total() == 0
    assert again.message == "SpiceDB matches the App DB"


async def test_one_reconcile_restores_every_permission_after_spicedb_lost_its_data(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    p = own_pipeline
    users = [new_event(role="admin" if i % 4 == 0 else "member") for i in range(100)]
    await asyncio.gather(*(create_user(u, client=p.client, task_queue=p.task_queue) for u in users))
    expected = [(u.user_id, u.org_id, u.role) for u in users]
    assert all(await holds_role(own_stores.spicedb, expected))

    # SpiceDB restarts on the same address with an empty memory datastore; the operator (or
    # `spicesync stack up`) writes the schema again.
    server = own_stores.server
    port = int(server.endpoint.rsplit(":", 1)[1])
    stop_pid(server.pid)
    restarted = await launch_spicedb(port=port, key=server.preshared_key)
    server.pid, server.log = restarted.pid, restarted.log
    assert not any(await holds_role(own_stores.spicedb, expected))

    # Small pages and few pages per run: the scan continues as new several times on the way.
    handle = await start_reconcile(
        ReconcileInput(dry_run=False, page_size=10, pages_per_run=3),
        client=p.client,
        task_queue=p.task_queue,
        workflow_id=f"reconcile-{uuid.uuid4()}",
    )
    report = await handle.result()
    assert report.found.missing == 100 and report.repairs.repaired == 100
    assert report.rows_scanned == 100  # each page scanned once across the runs
    assert all(await holds_role(own_stores.spicedb, expected))
    assert report.rows_scanned_per_second > 0 and report.relationships_written_per_second > 0
    first_run = p.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
    last_event = [e async for e in first_run.fetch_history_events()][-1]
    assert last_event.HasField("workflow_execution_continued_as_new_event_attributes")


async def test_the_prune_cap_stops_a_run_that_would_delete_too_much(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    p, spicedb = own_pipeline, own_stores.spicedb
    orphans = [str(uuid.uuid4()) for _ in range(5)]
    await touch(spicedb, *(Membership(user_id=o, org_id="gone", role="member") for o in orphans))
    [unsynced] = await insert_unsynced(own_stores.pool, 1, "kept-org")

    capped = await reconcile(p, dry_run=False, prune_cap=3)
    assert capped.prune_cap_exceeded and capped.deletions_planned == 5
    assert "prune cap exceeded" in capped.message and "nothing was deleted" in capped.message
    assert all([await relationships_of(spicedb, o) == [("gone", "member")] for o in orphans])
    # additions are not deletions: the missing user was still repaired
    assert await relationships_of(spicedb, unsynced) == [("kept-org", "member")]

    allowed = await reconcile(p, dry_run=False, prune_cap=5)
    assert not allowed.prune_cap_exceeded and allowed.repairs.repaired == 5
    assert all([await relationships_of(spicedb, o) == [] for o in orphans])


async def test_a_repair_takes_its_turn_with_the_users_live_events(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    p, spicedb = own_pipeline, own_stores.spicedb
    user = new_event()
    await create_user(user, client=p.client, task_queue=p.task_queue)
    await touch(spicedb, Membership(user_id=user.user_id, org_id="stray", role="admin"))
    # A role change and a reconcile race; whichever order they take, the user ends up exactly
    # as the App DB says, and both report success.
    live, report = await asyncio.gather(
        change_role(
            user.user_id,
            org_id=user.org_id,
            role="admin",
            version=2,
            client=p.client,
            task_queue=p.task_queue,
        ),
        reconcile(p, dry_run=False),
    )
    assert live.status == "synced"
    assert report.repairs.failed == 0
    assert await relationships_of(spicedb, user.user_id) == [(user.org_id, "admin")]
    final = await reconcile(p, dry_run=True)
    assert (final.found.missing, final.found.mismatched, final.found.orphan) == (0, 0, 0)


async def test_the_apps_own_relations_are_never_touched(
    own_pipeline: Pipeline, own_stores: OwnStores
) -> None:
    p, spicedb = own_pipeline, own_stores.spicedb
    # The app extends spicesync's schema with a relation of its own on organizations.
    extended = load_schema().replace(
        "    relation member: user\n", "    relation member: user\n    relation owner: user\n"
    )
    await write_schema(spicedb, extended)
    user = new_event()
    await create_user(user, client=p.client, task_queue=p.task_queue)
    owner = (user.org_id, "owner", user.user_id)
    foreign_owner = ("legacy-org", "owner", "legacy-7")
    for org, relation, subject in (owner, foreign_owner):
        await spicedb.WriteRelationships(
            WriteRelationshipsRequest(
                updates=[
                    RelationshipUpdate(
                        operation=_TOUCH,
                        relationship=Relationship(
                            resource=ObjectReference(object_type="organization", object_id=org),
                            relation=relation,
                            subject=SubjectReference(
                                object=ObjectReference(object_type="user", object_id=subject)
                            ),
                        ),
                    )
                ]
            )
        )
    await touch(spicedb, Membership(user_id="legacy-7", org_id="legacy-org", role="member"))

    report = await reconcile(p, dry_run=False)
    assert (report.found.missing, report.found.mismatched, report.found.orphan) == (0, 0, 1)
    assert report.samples["orphan"] == ["legacy-7"]
    await change_role(
        user.user_id,
        org_id=user.org_id,
        role="admin",
        version=2,
        client=p.client,
        task_queue=p.task_queue,
    )
    state = await everything(spicedb)
    assert owner in state and foreign_owner in state  # the app's relations survive both
    assert (user.org_id, "admin", user.user_id) in state
    assert ("legacy-org", "member", "legacy-7") not in state
