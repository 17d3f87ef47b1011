"""Record the histories the replay test replays: ``python -m tests.histories.record [NAME ...]``.

Runs against the local stack's Temporal and PostgreSQL (``spicesync stack up``), on a database
and a SpiceDB engine of its own (so a reconcile sees only what this script made), with a worker
of its own and no payload encryption (the replay test has no key). Histories:

* ``user_sync_delivered_lifecycle``: a user created and changing role (both delivered with
  ``WaitFor.START``, the ``deliver`` signal), moving and deleted (updates);
* ``user_sync_delivered_compensated``: a creation delivered with ``WaitFor.START``, refused
  (duplicate email) and compensated;
* ``user_sync_delivered_repaired``: a user (delivered with ``WaitFor.START``) whose membership
  SpiceDB lost, repaired by a reconcile;
* ``user_sync_closed_at_once``: a creation delivered with ``WaitFor.START`` and no idle time,
  whose run closes in the workflow task that applied it;
* ``user_sync_unfinished_removed``: a creation's row left pending with no sync (as a lost
  acceptance left it before the fix), removed by a reconcile;
* ``reconcile_unfinished``: the reconcile that removed the unfinished creation;
* ``reconcile_apply`` and ``backfill_checked`` (recorded by name only): a reconcile that
  repaired the user; a backfill of 30 users in batches of 10, paced by timers, that first
  counted the user syncs not checking SpiceDB under the row's lock (none: no version markers);
* ``followed_user_local_lifecycle`` (follow mode, recorded by name only): a followed user
  inserted, updated, changed in a burst, failing for good on an invalid object id, fixed, and
  deleted, in an app-shaped table of its own with the application's SpiceDB schema, each sync
  tried first as a local activity (patch ``follow-sync-local-first``);
* ``followed_user_local_closed_at_once`` (follow mode, recorded by name only): a followed
  user's change delivered with no idle time, whose run syncs and closes in its one workflow
  task;
* ``reconcile_follow`` and ``backfill_follow`` (follow mode, recorded by name only): a
  reconcile that delivered repairs (a missing relationship at once, an orphan after the scan)
  and a backfill of 30 never-synced rows in batches of 10, paced by timers.

Older recordings are kept, not re-recorded, so workflows started by older workers keep
replaying: ``user_sync_lifecycle`` and ``user_sync_compensated`` (every step a normal activity),
``user_sync_local_lifecycle``, ``user_sync_local_compensated`` and ``user_sync_repaired`` (every
step local, patch ``local-activity-steps``, before writes waited for the event's durable
acceptance, patch ``writes-after-durable-acceptance``); ``user_sync_durable_lifecycle``,
``user_sync_durable_compensated``, ``user_sync_durable_repaired`` and
``followed_user_lifecycle`` (every stage upserted as the sync entered it, before patch
``healthy-path-without-stage-upserts``); ``followed_user_quiet_lifecycle`` and
``followed_user_closed_at_once`` (that patch, each sync a normal activity, before
``follow-sync-local-first``); ``user_sync_quiet_lifecycle``,
``user_sync_quiet_compensated`` and ``user_sync_quiet_repaired`` (each patch asked on its own,
before the one ``release-2026-12-03`` marker); ``user_sync_release_lifecycle``,
``user_sync_release_compensated`` and ``user_sync_release_repaired`` (that marker, and a
``read_memberships`` step before each event's write, before ``release-2026-12-03b`` and its
write checked against the predicted state); ``user_sync_checked_lifecycle``,
``user_sync_checked_compensated`` and ``user_sync_checked_repaired`` (``release-2026-12-03b``:
the row recorded by an ``apply_row`` step after the write, before ``release-2026-12-03c`` and
the write recording it in its own transaction); ``user_sync_one_write_lifecycle``,
``user_sync_one_write_compensated`` and ``user_sync_one_write_repaired``
(``release-2026-12-03c``: a new run's ``read_user_state`` step before its first creation, before
``release-2026-12-04`` and the insert reading the state in its own transaction);
``user_sync_first_insert_lifecycle``, ``user_sync_first_insert_compensated`` and
``user_sync_first_insert_repaired`` (``release-2026-12-04``: every event's first write a normal
activity, before ``release-2026-12-04b`` and a signalled event's first write run locally), and
``user_sync_first_insert_signalled_lifecycle`` (the same code, recorded from 14fe3c7 with the
creation and the role change sent with ``WaitFor.START``);
``backfill_paced`` (version markers always, before patch ``backfill-markers-only-if-needed``);
``user_sync_durable_unfinished_removed`` and ``reconcile_durable_unfinished`` (the unfinished
creation's two, recorded with the ``writes-after-durable-acceptance`` code).

Re-record one when a workflow change is meant to be incompatible, and say so in the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from authzed.api.v1 import RelationshipUpdate, WriteRelationshipsRequest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.user_rows import UserRowActivities
from spicesync.client import FollowSyncFailed, deliver_change, user_changed
from spicesync.constants import followed_user_workflow_id, user_workflow_id
from spicesync.db import with_database
from spicesync.mapping import Tuple
from spicesync.models import (
    BackfillInput,
    CreateUserInput,
    InsertCreatedRowInput,
    ReconcileInput,
    UserChangedInput,
)
from spicesync.settings import Settings, load_settings
from spicesync.spicedb import SpiceDBClient, connect_spicedb, tuple_relationship, write_schema
from spicesync.stack.components import prepare_app_db, prepare_spicedb, start_spicedb
from spicesync.stack.processes import free_port, stop_pid, wait_for_port
from spicesync.temporal import connect_temporal
from starters.backfill import start_backfill
from starters.reconcile import start_reconcile
from starters.user_events import (
    UserSyncFailed,
    WaitFor,
    change_role,
    create_user,
    creation_event,
    delete_user,
    move_user,
)
from tests.integration.test_follow_mode import ACCOUNTS, APP_SCHEMA, MAPPING
from tests.integration.test_reconcile import insert_unsynced, revoke_all
from workers.worker import build_worker, open_resources

HERE = Path(__file__).parent
ALL = (
    "user_sync_delivered_lifecycle",
    "user_sync_delivered_compensated",
    "user_sync_delivered_repaired",
    "user_sync_unfinished_removed",
    "user_sync_closed_at_once",
    "reconcile_unfinished",
)
FOLLOW = (
    "followed_user_local_lifecycle",
    "followed_user_local_closed_at_once",
    "reconcile_follow",
    "backfill_follow",
)


async def record(names: list[str]) -> None:
    stack = load_settings()
    database = f"spicesync_record_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(stack.require_database_url())
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = with_database(stack.require_database_url(), database)
    await prepare_app_db(url)
    port, key = free_port(), uuid.uuid4().hex
    log = HERE / ".record-spicedb.log"
    pid, _ = start_spicedb(port=port, preshared_key=key, log=log)
    try:
        wait_for_port("127.0.0.1", port, pid=pid, timeout=60, log=log)
        await prepare_spicedb(f"127.0.0.1:{port}", key)
        settings = load_settings(
            encryption_keys=None,
            database_url=url,
            spicedb_endpoint=f"127.0.0.1:{port}",
            spicedb_preshared_key=key,
        )
        owned = [name for name in names if name not in FOLLOW]
        if owned:
            await _run(settings, owned)
        if set(names) & set(FOLLOW):
            await _run_follow(settings, [name for name in names if name in FOLLOW])
    finally:
        stop_pid(pid)
        (HERE / ".record-spicedb.log").unlink(missing_ok=True)
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        await admin.close()


async def _run(settings: Settings, names: list[str]) -> None:
    client = await connect_temporal(settings)
    task_queue = f"record-{uuid.uuid4()}"
    org = f"replay-{uuid.uuid4().hex[:8]}"
    synced = CreateUserInput(
        user_id=str(uuid.uuid4()),
        email=f"r-{org}@example.com",
        name="Replay",
        org_id=org,
        role="admin",
    )
    repaired = synced.model_copy(
        update={"user_id": str(uuid.uuid4()), "email": f"fix-{org}@example.com"}
    )
    # The repaired user keeps its row, so the same email in another case is refused.
    refused = repaired.model_copy(
        update={"user_id": str(uuid.uuid4()), "email": repaired.email.upper()}
    )
    unfinished = synced.model_copy(
        update={"user_id": str(uuid.uuid4()), "email": f"left-{org}@example.com"}
    )
    closed = synced.model_copy(
        update={"user_id": str(uuid.uuid4()), "email": f"once-{org}@example.com"}
    )
    queue = {"client": client, "task_queue": task_queue}
    histories: dict[str, str] = {}
    async with (
        open_resources(settings) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        uid = synced.user_id
        start = {"wait": WaitFor.START, **queue}
        await create_user(synced, **start)  # type: ignore[arg-type]
        await change_role(uid, org_id=org, role="member", version=2, **start)  # type: ignore[arg-type]
        # An update waits for every lower version too: both signalled events are applied first.
        await move_user(uid, org_id=f"{org}-b", role="member", version=3, **queue)  # type: ignore[arg-type]
        await delete_user(uid, version=4, **queue)  # type: ignore[arg-type]
        await create_user(repaired, **start)  # type: ignore[arg-type]
        await create_user(repaired, **queue)  # type: ignore[arg-type]
        await create_user(refused, **start)  # type: ignore[arg-type]
        with contextlib.suppress(UserSyncFailed):
            await create_user(refused, **queue)  # type: ignore[arg-type]
        await create_user(closed, idle=timedelta(0), **start)  # type: ignore[arg-type]
        await client.get_workflow_handle(user_workflow_id(closed.user_id)).result()
        endpoint, key = settings.require_spicedb()
        spicedb = connect_spicedb(endpoint, key)
        await revoke_all(spicedb, repaired.user_id)
        await spicedb.close()
        reconcile = await start_reconcile(
            ReconcileInput(dry_run=False, page_size=2),
            **queue,
            workflow_id="record-reconcile",  # type: ignore[arg-type]
        )
        await reconcile.result()
        histories["reconcile_apply"] = (await reconcile.fetch_history()).to_json()
        pool = await asyncpg.create_pool(settings.require_database_url(), min_size=1, max_size=2)
        assert pool is not None
        await ActivityEnvironment().run(
            UserRowActivities(pool).insert_created_row,
            InsertCreatedRowInput(event=creation_event(unfinished)),
        )
        await pool.execute(
            "UPDATE users SET created_at = now() - interval '10 minutes' WHERE id = $1",
            uuid.UUID(unfinished.user_id),
        )
        cleanup = await start_reconcile(
            ReconcileInput(dry_run=False, page_size=2),
            **queue,
            workflow_id="record-reconcile-unfinished",  # type: ignore[arg-type]
        )
        await cleanup.result()
        histories["reconcile_unfinished"] = (await cleanup.fetch_history()).to_json()
        await insert_unsynced(pool, 30, "backfilled-org")
        await pool.close()
        backfill = await start_backfill(
            BackfillInput(batch_size=10, max_rate=100.0),
            **queue,
            workflow_id="record-backfill",  # type: ignore[arg-type]
        )
        await backfill.result()
        histories["backfill_checked"] = (await backfill.fetch_history()).to_json()
    for name, user in (
        ("user_sync_delivered_lifecycle", synced),
        ("user_sync_delivered_compensated", refused),
        ("user_sync_delivered_repaired", repaired),
        ("user_sync_unfinished_removed", unfinished),
        ("user_sync_closed_at_once", closed),
    ):
        handle = client.get_workflow_handle(user_workflow_id(user.user_id))
        histories[name] = (await handle.fetch_history()).to_json()
    for name in names:
        (HERE / f"{name}.json").write_text(histories[name])
        print(f"wrote {name}.json")


async def _run_follow(settings: Settings, names: list[str]) -> None:
    """Follow mode: an app-shaped table and schema, a user through every kind of sync."""
    pool = await asyncpg.create_pool(settings.require_database_url(), min_size=1, max_size=4)
    assert pool is not None
    schema = f"app_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE SCHEMA {schema}")
    await pool.execute(ACCOUNTS.format(schema=schema))
    endpoint, key = settings.require_spicedb()
    spicedb = connect_spicedb(endpoint, key)
    await write_schema(spicedb, APP_SCHEMA)
    config = HERE / ".record-spicesync.toml"
    config.write_text(MAPPING.format(schema=schema))
    follow = settings.model_copy(update={"config_path": config})
    client = await connect_temporal(follow)
    queue = {"client": client, "task_queue": f"record-{uuid.uuid4()}"}
    uid, table = str(uuid.uuid4()), f"{schema}.accounts"
    histories: dict[str, str] = {}
    try:
        async with (
            open_resources(follow) as resources,
            build_worker(client, resources, task_queue=queue["task_queue"]),  # type: ignore[arg-type]
        ):
            await pool.execute(
                f"INSERT INTO {table} (account_id, email, team_id, is_admin, squad, squad_role)"
                " VALUES ($1, 'replay@example.com', 'replay-org', true, 'red', 'lead')",
                uuid.UUID(uid),
            )
            await user_changed(uid, 1, wait="applied", **queue)  # type: ignore[arg-type]
            await user_changed(uid, 1, wait="applied", **queue)  # type: ignore[arg-type]
            for version in range(2, 12):
                await pool.execute(
                    f"UPDATE {table} SET row_version = $2, is_admin = NOT is_admin"
                    " WHERE account_id = $1",
                    uuid.UUID(uid),
                    version,
                )
                await deliver_change(UserChangedInput(user_id=uid, version=version), **queue)  # type: ignore[arg-type]
            await user_changed(uid, 11, wait="applied", **queue)  # type: ignore[arg-type]
            await pool.execute(
                f"UPDATE {table} SET row_version = 12, squad = 'not a team!' WHERE account_id = $1",
                uuid.UUID(uid),
            )
            with contextlib.suppress(FollowSyncFailed):
                await user_changed(uid, 12, wait="applied", **queue)  # type: ignore[arg-type]
            await pool.execute(
                f"UPDATE {table} SET row_version = 13, squad = 'blue' WHERE account_id = $1",
                uuid.UUID(uid),
            )
            await user_changed(uid, 13, wait="applied", **queue)  # type: ignore[arg-type]
            await pool.execute(f"DELETE FROM {table} WHERE account_id = $1", uuid.UUID(uid))
            await user_changed(uid, wait="applied", **queue)  # type: ignore[arg-type]
            handle = client.get_workflow_handle(followed_user_workflow_id(uid))
            histories["followed_user_local_lifecycle"] = (await handle.fetch_history()).to_json()
            histories["followed_user_local_closed_at_once"] = await _closed_at_once(
                pool, table, queue
            )
            histories |= await _follow_maintenance(pool, spicedb, table, queue)
    finally:
        config.unlink(missing_ok=True)
        await spicedb.close()
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()
    for name in names:
        (HERE / f"{name}.json").write_text(histories[name])
        print(f"wrote {name}.json")


async def _closed_at_once(pool: asyncpg.Pool, table: str, queue: dict[str, Any]) -> str:
    """A change delivered with no idle time: the run syncs and closes in one workflow task."""
    uid = str(uuid.uuid4())
    await pool.execute(
        f"INSERT INTO {table} (account_id, email, team_id, is_admin, squad, squad_role)"
        " VALUES ($1, 'closed@example.com', 'replay-org', false, 'red', 'member')",
        uuid.UUID(uid),
    )
    await deliver_change(UserChangedInput(user_id=uid, version=1), idle=timedelta(0), **queue)
    handle = queue["client"].get_workflow_handle(followed_user_workflow_id(uid))
    await handle.result()
    return str((await handle.fetch_history()).to_json())


async def _follow_maintenance(
    pool: asyncpg.Pool, spicedb: SpiceDBClient, table: str, queue: dict[str, Any]
) -> dict[str, str]:
    """Follow mode's reconcile (repairing) and backfill (paced), on the same table."""
    client: Client = queue["client"]
    synced = [uuid.uuid4() for _ in range(2)]
    await pool.executemany(
        f"INSERT INTO {table} (account_id, email, team_id) VALUES ($1, 'r@example.com', 'r-org')",
        [(u,) for u in synced],
    )
    for user in synced:
        await user_changed(str(user), wait="applied", **queue)
    lost = RelationshipUpdate.Operation.OPERATION_DELETE
    orphan = RelationshipUpdate.Operation.OPERATION_TOUCH
    await spicedb.WriteRelationships(
        WriteRelationshipsRequest(
            updates=[
                RelationshipUpdate(
                    operation=lost,
                    relationship=tuple_relationship(
                        Tuple("organization", "r-org", "member", "user", str(synced[0]))
                    ),
                ),
                RelationshipUpdate(
                    operation=orphan,
                    relationship=tuple_relationship(
                        Tuple("organization", "r-org", "member", "user", str(uuid.uuid4()))
                    ),
                ),
            ]
        )
    )
    reconcile = await start_reconcile(
        ReconcileInput(dry_run=False, follow=True),
        workflow_id=f"record-reconcile-{uuid.uuid4()}",
        **queue,
    )
    await reconcile.result()
    await pool.executemany(
        f"INSERT INTO {table} (account_id, email, team_id) VALUES ($1, 'b@example.com', 'b-org')",
        [(uuid.uuid4(),) for _ in range(30)],
    )
    backfill = await start_backfill(
        BackfillInput(follow=True, batch_size=10, max_rate=5.0),
        workflow_id=f"record-backfill-{uuid.uuid4()}",
        **queue,
    )
    await backfill.result()
    return {
        "reconcile_follow": (await reconcile.fetch_history()).to_json(),
        "backfill_follow": (
            await client.get_workflow_handle(backfill.id).fetch_history()
        ).to_json(),
    }


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1:] or list(ALL)))
