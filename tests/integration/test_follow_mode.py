"""Follow mode end to end: an app-shaped table, the app's SpiceDB schema, a worker, real engines.

The "application" writes its own ``accounts`` table with plain SQL (in a schema of the test's
own) and says "user X changed"; the followed user's workflow brings SpiceDB in step.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import asyncpg
import pytest
from authzed.api.v1 import (
    Consistency,
    ReadRelationshipsRequest,
    RelationshipFilter,
    RelationshipUpdate,
    SubjectFilter,
    WriteRelationshipsRequest,
)
from pydantic import SecretStr
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.followed_users import FollowedUserActivities
from chaos.proxy import FaultProxy
from spicesync.app_table import AppTableMismatch, inspect_app_table
from spicesync.client import ChangeNotAccepted, FollowSyncFailed, deliver_change, user_changed
from spicesync.constants import followed_user_workflow_id
from spicesync.mapping import Tuple, parse_mapping
from spicesync.models import SyncFollowedUserInput, UserChangedInput
from spicesync.settings import Settings
from spicesync.spicedb import (
    SpiceDBClient,
    check_schema,
    has_org_permission,
    tuple_relationship,
    write_schema,
)
from starters.stuck import find_failed_followed, find_stuck
from tests.conftest import SpiceDBServer, launch_spicedb, stop_spicedb
from tests.integration.conftest import eventually, temporal_through_proxy
from workers.worker import build_worker, open_resources
from workflows.user_sync import LAST_ERROR, STAGE

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "spicesync"]

# The application's own schema: spicesync's marker (relation + definition) added to it.
APP_SCHEMA = """
definition user {
    relation sync_version: spicesync_version
}

definition spicesync_version {}

definition organization {
    relation owner: user
    relation admin: user
    relation member: user
    permission manage = owner + admin
    permission view = manage + member
}

definition team {
    relation lead: user
    relation member: user
    permission view = lead + member
}
"""

MAPPING = """
[source]
table = "{schema}.accounts"
id = "account_id"
version = "row_version"

[[relationships]]
resource = "organization:{{team_id}}"
relation = "admin"
subject = "user:{{account_id}}"
when = "is_admin"

[[relationships]]
resource = "organization:{{team_id}}"
relation = "member"
subject = "user:{{account_id}}"
unless = "is_admin"

[[relationships]]
resource = "team:{{squad}}"
relation = "{{squad_role}}"
relations = ["lead", "member"]
subject = "user:{{account_id}}"
"""

ACCOUNTS = """
CREATE TABLE {schema}.accounts (
    account_id  uuid    PRIMARY KEY,
    email       text    NOT NULL,
    team_id     text,
    is_admin    boolean NOT NULL DEFAULT false,
    squad       text,
    squad_role  text,
    row_version bigint  NOT NULL DEFAULT 1
)
"""


@pytest.fixture(scope="module")
async def app_spicedb() -> AsyncIterator[SpiceDBServer]:
    """A SpiceDB engine with the application's schema (not spicesync's packaged one)."""
    server = await launch_spicedb()
    admin = server.client()
    await write_schema(admin, APP_SCHEMA)
    await admin.close()
    yield server
    stop_spicedb(server)


@dataclass
class FollowApp:
    """The application's table, its mapping, a follow-mode worker, and what tests observe."""

    client: Client
    task_queue: str
    pool: asyncpg.Pool
    spicedb: SpiceDBClient
    schema: str
    settings: Settings

    @property
    def table(self) -> str:
        return f"{self.schema}.accounts"

    async def insert(self, user_id: str, **values: object) -> None:
        fields = {"account_id": uuid.UUID(user_id), "email": f"{user_id[:8]}@example.com"} | values
        columns = ", ".join(fields)
        marks = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
        await self.pool.execute(
            f"INSERT INTO {self.table} ({columns}) VALUES ({marks})", *fields.values()
        )

    async def update(self, user_id: str, **values: object) -> int:
        """Update the row as the app would, bumping its version; returns the new version."""
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(values, start=2))
        sets = f"{sets}, row_version = row_version + 1" if sets else "row_version = row_version + 1"
        version = await self.pool.fetchval(
            f"UPDATE {self.table} SET {sets} WHERE account_id = $1 RETURNING row_version",
            uuid.UUID(user_id),
            *values.values(),
        )
        assert version is not None
        return int(version)

    async def delete(self, user_id: str) -> None:
        await self.pool.execute(
            f"DELETE FROM {self.table} WHERE account_id = $1", uuid.UUID(user_id)
        )

    async def changed(self, user_id: str, version: int | None = None) -> object:
        return await user_changed(
            user_id, version, wait="applied", client=self.client, task_queue=self.task_queue
        )

    async def bookkeeping(self, user_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            "SELECT * FROM spicesync_followed_users WHERE user_id = $1", user_id
        )


def new_user() -> str:
    return str(uuid.uuid4())


def org() -> str:
    return f"org-{uuid.uuid4().hex[:12]}"


async def held_by(spicedb: SpiceDBClient, user_id: str) -> set[str]:
    """Every organization and team relationship the user holds (the app's own included)."""
    found = set()
    for resource_type in ("organization", "team"):
        async for r in spicedb.ReadRelationships(
            ReadRelationshipsRequest(
                consistency=Consistency(fully_consistent=True),
                relationship_filter=RelationshipFilter(
                    resource_type=resource_type,
                    optional_subject_filter=SubjectFilter(
                        subject_type="user", optional_subject_id=user_id
                    ),
                ),
            )
        ):
            rel = r.relationship
            found.add(f"{resource_type}:{rel.resource.object_id}#{rel.relation}")
    return found


async def marker_of(spicedb: SpiceDBClient, user_id: str) -> list[str]:
    return [
        r.relationship.subject.object.object_id
        async for r in spicedb.ReadRelationships(
            ReadRelationshipsRequest(
                consistency=Consistency(fully_consistent=True),
                relationship_filter=RelationshipFilter(
                    resource_type="user", optional_resource_id=user_id
                ),
            )
        )
    ]


async def syncs_of(client: Client, user_id: str) -> int:
    """Syncs the user's workflow ran, over every run of it.

    A sync runs as a local activity that succeeded (a marker with its result; the workflow's
    only local activity) or, after a local try that failed, as a scheduled activity.
    """
    count = 0
    async for execution in client.list_workflows(
        f"WorkflowId = '{followed_user_workflow_id(user_id)}'"
    ):
        history = await client.get_workflow_handle(
            execution.id, run_id=execution.run_id
        ).fetch_history()
        for e in history.events:
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                name = e.activity_task_scheduled_event_attributes.activity_type.name
                count += name == "sync_followed_user"
            elif e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
                marker = e.marker_recorded_event_attributes
                count += marker.marker_name == "core_local_activity" and "result" in marker.details
    return count


async def insert_account(app_db: asyncpg.Pool, app_table: str, user_id: str, team: str) -> None:
    """The application's insert of a plain member of ``team``."""
    await app_db.execute(
        f"INSERT INTO {app_table}.accounts (account_id, email, team_id) VALUES ($1, 'x@y.z', $2)",
        uuid.UUID(user_id),
        team,
    )


async def recorded_synced(app_db: asyncpg.Pool, user_id: str) -> bool:
    """Whether spicesync's bookkeeping records the user's last sync as successful."""
    row = await app_db.fetchrow(
        "SELECT status FROM spicesync_followed_users WHERE user_id = $1", user_id
    )
    return row is not None and row["status"] == "synced"


async def held_by_server(server: SpiceDBServer, user_id: str) -> set[str]:
    """:func:`held_by`, through a client of its own."""
    spicedb = server.client()
    try:
        return await held_by(spicedb, user_id)
    finally:
        await spicedb.close()


def mapping_file(tmp_path: Path, schema: str) -> Path:
    path = tmp_path / "spicesync.toml"
    path.write_text(MAPPING.format(schema=schema))
    return path


@pytest.fixture
async def app_table(app_db: asyncpg.Pool) -> AsyncIterator[str]:
    """A PostgreSQL schema of this test's own holding the application's ``accounts``."""
    schema = f"app_{uuid.uuid4().hex[:12]}"
    await app_db.execute(f"CREATE SCHEMA {schema}")
    await app_db.execute(ACCOUNTS.format(schema=schema))
    yield schema
    await app_db.execute(f"DROP SCHEMA {schema} CASCADE")


def follow_settings(database_url: str, server: SpiceDBServer, config: Path) -> Settings:
    return Settings(
        database_url=database_url,
        spicedb_endpoint=server.endpoint,
        spicedb_preshared_key=server.preshared_key,
        config_path=config,
    )


@pytest.fixture
async def follow_app(
    client: Client,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    app_spicedb: SpiceDBServer,
    app_table: str,
    tmp_path: Path,
) -> AsyncIterator[FollowApp]:
    settings = follow_settings(database_url, app_spicedb, mapping_file(tmp_path, app_table))
    spicedb = app_spicedb.client()
    async with (
        open_resources(settings) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        yield FollowApp(client, task_queue, app_db, spicedb, app_table, settings)
    await spicedb.close()


async def test_the_mapping_rules_end_to_end_leaving_the_apps_own_relation_alone(
    follow_app: FollowApp,
) -> None:
    app, uid, team = follow_app, new_user(), org()
    # The application's own relation on the same organization: never read, written or removed.
    await app.spicedb.WriteRelationships(
        WriteRelationshipsRequest(
            updates=[
                RelationshipUpdate(
                    operation=RelationshipUpdate.Operation.OPERATION_TOUCH,
                    relationship=tuple_relationship(
                        Tuple("organization", team, "owner", "user", uid)
                    ),
                )
            ]
        )
    )
    owner = f"organization:{team}#owner"

    await app.insert(uid, team_id=team, is_admin=True, squad="red", squad_role="lead")
    outcome = await app.changed(uid, 1)
    assert outcome.status == "synced" and outcome.zed_token
    assert await held_by(app.spicedb, uid) == {owner, f"organization:{team}#admin", "team:red#lead"}
    # The token the caller got: a check at least as fresh sees the write.
    assert await has_org_permission(
        app.spicedb, user_id=uid, org_id=team, permission="manage", zed_token=outcome.zed_token
    )
    kept = await app.bookkeeping(uid)
    assert kept is not None
    assert (kept["status"], kept["applied_version"], kept["relationships"]) == ("synced", 1, 2)
    assert kept["zed_token"] == outcome.zed_token
    assert await marker_of(app.spicedb, uid) == [str(kept["marker"])]

    # `unless`, a relation taken from a column.
    version = await app.update(uid, is_admin=False, squad_role="member")
    outcome = await app.changed(uid, version)
    assert outcome.status == "synced"
    assert await held_by(app.spicedb, uid) == {
        owner,
        f"organization:{team}#member",
        "team:red#member",
    }

    # A NULL skips its rule; the rest stays.
    version = await app.update(uid, squad=None)
    await app.changed(uid, version)
    assert await held_by(app.spicedb, uid) == {owner, f"organization:{team}#member"}

    # The row deleted: every managed relationship goes, the app's own stays.
    await app.delete(uid)
    outcome = await app.changed(uid)
    assert outcome.status == "synced"
    assert await held_by(app.spicedb, uid) == {owner}
    # The owner still manages it (the app's relation survived), at the token of the deletion.
    assert await has_org_permission(
        app.spicedb, user_id=uid, org_id=team, permission="manage", zed_token=outcome.zed_token
    )
    kept = await app.bookkeeping(uid)
    assert kept is not None and kept["status"] == "synced" and kept["relationships"] == 0


def cli_env(
    temporal_env: WorkflowEnvironment,
    keys: str,
    task_queue: str,
    database_url: str,
    server: SpiceDBServer,
    config: Path,
    state: Path,
) -> dict[str, str]:
    """The environment of a `spicesync` command on this test's engines, in follow mode."""
    settings = Settings(
        temporal_address=temporal_env.client.service_client.config.target_host,
        temporal_namespace=temporal_env.client.namespace,
        encryption_keys=SecretStr(keys),
        _env_file=None,
    )
    environment = settings.worker_environment(
        task_queue=task_queue,
        database_url=database_url,
        spicedb_endpoint=server.endpoint,
        spicedb_key=server.preshared_key,
    )
    return environment | {"SPICESYNC_STATE_DIR": str(state), "SPICESYNC_CONFIG": str(config)}


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_duplicate_change_writes_nothing_and_an_old_version_needs_no_sync(
    follow_app: FollowApp,
) -> None:
    app, uid, team = follow_app, new_user(), org()
    await app.insert(uid, team_id=team)
    first = await app.changed(uid, 1)
    assert first.status == "synced"
    marker = await marker_of(app.spicedb, uid)
    kept = await app.bookkeeping(uid)
    assert kept is not None and marker == [str(kept["marker"])]

    # The same change again, without a version: a sync runs, finds nothing to change and
    # writes nothing (every spicesync write moves the marker; it did not move).
    again = await app.changed(uid)
    assert again.status == "unchanged" and again.zed_token
    assert await marker_of(app.spicedb, uid) == marker
    kept_again = await app.bookkeeping(uid)
    assert kept_again is not None and kept_again["marker"] == kept["marker"]
    assert await has_org_permission(
        app.spicedb, user_id=uid, org_id=team, permission="view", zed_token=again.zed_token
    )
    syncs = await syncs_of(app.client, uid)
    assert syncs == 2

    # A late change whose version was already synced: no sync at all.
    late = await app.changed(uid, 1)
    assert late.status == "skipped" and late.zed_token == again.zed_token
    assert await syncs_of(app.client, uid) == syncs


async def test_a_burst_of_50_changes_ends_in_the_rows_state_with_fewer_syncs(
    follow_app: FollowApp,
) -> None:
    app, uid = follow_app, new_user()
    teams = [org() for _ in range(3)]
    await app.insert(uid, team_id=teams[0], squad="blue", squad_role="member")
    changes = 50

    async def change(i: int) -> None:
        # The app's transaction, then its "user changed" (signal-with-start: no waiting for a
        # worker); fifty of them at once, racing each other and the syncs.
        version = await app.update(
            uid,
            team_id=teams[i % 3],
            is_admin=i % 2 == 0,
            squad_role="lead" if i % 5 == 0 else "member",
        )
        await deliver_change(
            UserChangedInput(user_id=uid, version=version, source="app"),
            client=app.client,
            task_queue=app.task_queue,
        )

    await asyncio.gather(*(change(i) for i in range(changes)))
    final = await app.pool.fetchrow(
        f"SELECT * FROM {app.table} WHERE account_id = $1", uuid.UUID(uid)
    )
    assert final is not None and final["row_version"] == changes + 1

    async def caught_up() -> bool:
        kept = await app.bookkeeping(uid)
        return kept is not None and kept["applied_version"] == changes + 1

    await eventually(caught_up, timeout=120)
    role = "admin" if final["is_admin"] else "member"
    assert await held_by(app.spicedb, uid) == {
        f"organization:{final['team_id']}#{role}",
        f"team:blue#{final['squad_role']}",
    }
    syncs = await syncs_of(app.client, uid)
    print(f"{changes} changes -> {syncs} syncs")
    assert 1 <= syncs < changes


async def test_changes_delivered_while_no_worker_runs_coalesce_into_one_sync(
    client: Client,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    app_spicedb: SpiceDBServer,
    app_table: str,
    tmp_path: Path,
) -> None:
    settings = follow_settings(database_url, app_spicedb, mapping_file(tmp_path, app_table))
    uid, team = new_user(), org()
    await insert_account(app_db, app_table, uid, team)
    # Durable as soon as Temporal answers: no worker polls this queue yet.
    for _ in range(20):
        await deliver_change(UserChangedInput(user_id=uid), client=client, task_queue=task_queue)
    async with (
        open_resources(settings) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        await eventually(lambda: recorded_synced(app_db, uid), timeout=60)
    assert await syncs_of(client, uid) == 1
    assert await held_by_server(app_spicedb, uid) == {f"organization:{team}#member"}


async def test_a_sync_that_cannot_reach_spicedb_goes_on_as_a_visible_retrying_activity(
    client: Client,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    app_spicedb: SpiceDBServer,
    app_table: str,
    tmp_path: Path,
) -> None:
    """SpiceDB unreachable: the sync's local try fails, and the sync goes on as a normal
    activity, retried, shown as ``syncing`` and listed by ``stuck``, until SpiceDB is back."""
    host, _, port = app_spicedb.endpoint.rpartition(":")
    uid, team = new_user(), org()
    await insert_account(app_db, app_table, uid, team)
    handle = client.get_workflow_handle(followed_user_workflow_id(uid))
    async with FaultProxy((host, int(port))) as proxy:
        settings = Settings(
            database_url=database_url,
            spicedb_endpoint=proxy.address,
            spicedb_preshared_key=app_spicedb.preshared_key,
            config_path=mapping_file(tmp_path, app_table),
        )
        async with (
            open_resources(settings) as resources,
            build_worker(client, resources, task_queue=task_queue),
        ):
            await proxy.refuse()
            await deliver_change(
                UserChangedInput(user_id=uid), client=client, task_queue=task_queue
            )

            async def shown_syncing() -> bool:
                attributes = (await handle.describe()).typed_search_attributes
                return attributes.get(STAGE) == "syncing" and attributes.get(LAST_ERROR) is not None

            await eventually(shown_syncing, timeout=60)
            stuck = await find_stuck(client, older_than=timedelta(0))
            assert [s.stage for s in stuck if s.user_id == uid] == ["syncing"]
            await proxy.restore()

            await eventually(lambda: recorded_synced(app_db, uid), timeout=120)
    attributes = (await handle.describe()).typed_search_attributes
    assert (attributes.get(STAGE), attributes.get(LAST_ERROR)) == ("idle", None)
    history = await handle.fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled == ["sync_followed_user"]  # after the one local try
    assert await syncs_of(client, uid) == 1
    assert await held_by_server(app_spicedb, uid) == {f"organization:{team}#member"}


async def test_a_permanent_failure_is_recorded_listed_by_stuck_and_fixed_by_the_next_change(
    follow_app: FollowApp,
    temporal_env: WorkflowEnvironment,
    test_codec_keys: str,
    database_url: str,
    app_spicedb: SpiceDBServer,
    tmp_path: Path,
) -> None:
    app, uid, team = follow_app, new_user(), org()
    await app.insert(uid, team_id=team, squad="no such team!", squad_role="lead")
    with pytest.raises(FollowSyncFailed) as failed:
        await app.changed(uid, 1)
    assert failed.value.outcome.error_type == "RowUnmappable"
    # The message names the rule and the columns, never the value.
    assert "relationships[2].resource" in str(failed.value)
    assert "no such team" not in str(failed.value)
    kept = await app.bookkeeping(uid)
    assert kept is not None and (kept["status"], kept["last_error"]) == ("failed", "RowUnmappable")
    handle = app.client.get_workflow_handle(followed_user_workflow_id(uid))
    attributes = (await handle.describe()).typed_search_attributes
    assert (attributes.get(STAGE), attributes.get(LAST_ERROR)) == ("failed", "RowUnmappable")
    # Nothing was written for the user, and the application's row is untouched.
    assert await held_by(app.spicedb, uid) == set()
    row = await app.pool.fetchrow(
        f"SELECT * FROM {app.table} WHERE account_id = $1", uuid.UUID(uid)
    )
    assert row is not None and row["squad"] == "no such team!"

    listed = await find_failed_followed(app.pool, older_than=timedelta(0))
    assert [(s.user_id, s.stage, s.last_error) for s in listed if s.user_id == uid] == [
        (uid, "failed", "RowUnmappable")
    ]
    env = cli_env(
        temporal_env,
        test_codec_keys,
        app.task_queue,
        database_url,
        app_spicedb,
        mapping_file(tmp_path, app.schema),
        tmp_path / "state",
    )
    code, out, err = await run_cli(env, "stuck", "--older-than", "0s", "--json")
    assert code == 0, err
    assert [
        (s["user_id"], s["stage"], s["last_error"]) for s in json.loads(out) if s["user_id"] == uid
    ] == [(uid, "failed", "RowUnmappable")]

    # The application fixes the row; its next change (here from the command line) syncs it.
    version = await app.update(uid, squad="red")
    code, out, err = await run_cli(
        env, "users", "changed", "--user-id", uid, "--version", str(version)
    )
    assert code == 0, err
    printed = json.loads(out)
    assert (printed["status"], printed["version"]) == ("synced", version) and printed["zed_token"]
    assert await held_by(app.spicedb, uid) == {f"organization:{team}#member", "team:red#lead"}
    kept = await app.bookkeeping(uid)
    assert kept is not None and (kept["status"], kept["last_error"]) == ("synced", None)
    attributes = (await handle.describe()).typed_search_attributes
    assert (attributes.get(STAGE), attributes.get(LAST_ERROR)) == ("idle", None)
    assert not [
        s for s in await find_failed_followed(app.pool, older_than=timedelta(0)) if s.user_id == uid
    ]


async def test_the_worker_refuses_a_mapping_the_table_does_not_fit(
    temporal_env: WorkflowEnvironment,
    test_codec_keys: str,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    app_spicedb: SpiceDBServer,
    app_table: str,
    tmp_path: Path,
) -> None:
    # `is_admin` of the wrong type, and a column the table does not have.
    await app_db.execute(f"ALTER TABLE {app_table}.accounts ALTER COLUMN is_admin TYPE text")
    config = tmp_path / "bad.toml"
    config.write_text(MAPPING.format(schema=app_table).replace("team:{squad}", "team:{squad_name}"))
    settings = follow_settings(database_url, app_spicedb, config)
    with pytest.raises(AppTableMismatch) as refused:
        async with open_resources(settings):
            pass
    assert str(refused.value).splitlines() == [
        f"{config}: relationships[0].when: column is_admin is text; it must be boolean",
        f"{config}: relationships[1].unless: column is_admin is text; it must be boolean",
        f"{config}: relationships[2].resource: column squad_name does not exist in"
        f" {app_table}.accounts",
    ]
    env = cli_env(
        temporal_env, test_codec_keys, task_queue, database_url, app_spicedb, config, tmp_path
    )
    code, _out, err = await run_cli(env, "worker")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "relationships[2].resource: column squad_name does not exist" in lines[0]


async def test_the_app_schema_check_names_what_the_mapping_needs(
    app_spicedb: SpiceDBServer,
) -> None:
    spicedb = app_spicedb.client()
    try:
        mapping = parse_mapping(MAPPING.format(schema="public"))
        assert await check_schema(spicedb, mapping.required_schema()) == []
        # The packaged (owned-mode) schema lacks the team definition the mapping writes.
        assert await check_schema(spicedb) == []
        mapping = parse_mapping(
            MAPPING.format(schema="public").replace('["lead", "member"]', '["lead", "coach"]')
        )
        assert await check_schema(spicedb, mapping.required_schema()) == ["team#coach: user"]
    finally:
        await spicedb.close()


async def test_a_schema_without_a_managed_relation_parks_until_fixed_and_resumed(
    client: Client,
    temporal_env: WorkflowEnvironment,
    test_codec_keys: str,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    app_table: str,
    tmp_path: Path,
) -> None:
    server = await launch_spicedb()
    spicedb = server.client()
    try:
        # An operator's mistake: the team's `lead` relation the mapping writes is missing.
        broken = APP_SCHEMA.replace("relation lead: user", "").replace("lead + member", "member")
        await write_schema(spicedb, broken)
        config = mapping_file(tmp_path, app_table)
        settings = follow_settings(database_url, server, config)
        uid, team = new_user(), org()
        await app_db.execute(
            f"INSERT INTO {app_table}.accounts (account_id, email, team_id, squad, squad_role)"
            " VALUES ($1, 'x@y.z', $2, 'red', 'lead')",
            uuid.UUID(uid),
            team,
        )
        async with (
            open_resources(settings) as resources,
            build_worker(client, resources, task_queue=task_queue),
        ):
            waiting = asyncio.ensure_future(
                user_changed(uid, wait="applied", client=client, task_queue=task_queue)
            )
            handle = client.get_workflow_handle(followed_user_workflow_id(uid))

            async def parked() -> bool:
                try:
                    attributes = (await handle.describe()).typed_search_attributes
                except RPCError:  # not started yet
                    return False
                return attributes.get(STAGE) == "parked"

            await eventually(parked, timeout=60)
            assert (await handle.describe()).typed_search_attributes.get(LAST_ERROR) == (
                "SchemaMismatch"
            )
            assert uid in [s.user_id for s in await find_stuck(client, older_than=timedelta(0))]
            # Parked, not failed: nothing written, nothing recorded as a failure.
            assert await held_by(spicedb, uid) == set()
            assert not waiting.done()

            await write_schema(spicedb, APP_SCHEMA)  # the fix
            env = cli_env(
                temporal_env, test_codec_keys, task_queue, database_url, server, config, tmp_path
            )
            code, out, err = await run_cli(env, "repair", "resume", "--followed-user-id", uid)
            assert code == 0, err
            assert json.loads(out) == {"user_id": uid, "action": "resume", "resumed": True}
            outcome = await asyncio.wait_for(waiting, 60)
            assert outcome.status == "synced"
            assert await held_by(spicedb, uid) == {f"organization:{team}#member", "team:red#lead"}
    finally:
        await spicedb.close()
        stop_spicedb(server)


@pytest.mark.parametrize(
    ("id_type", "ids"),
    [
        ("uuid", [str(uuid.UUID(int=i + 1)) for i in range(3000)]),
        ("bigint", [str(i * 7) for i in range(3000)]),
        ("integer", [str(-i) for i in range(3000)]),
        ("text", [f"acct-{i}" for i in range(3000)]),
        ("varchar(40)", [f"U{i}" for i in range(3000)]),
    ],
)
async def test_the_row_is_read_through_the_id_columns_index(
    app_db: asyncpg.Pool, app_table: str, id_type: str, ids: list[str]
) -> None:
    await app_db.execute(
        f"CREATE TABLE {app_table}.people (pid {id_type} PRIMARY KEY, org text, pii text)"
    )
    await app_db.execute(
        f"INSERT INTO {app_table}.people SELECT x::{id_type}, 'org-' || x, 'secret'"
        " FROM unnest($1::text[]) AS x",
        ids,
    )
    await app_db.execute(f"ANALYZE {app_table}.people")
    mapping = parse_mapping(
        f'[source]\ntable = "{app_table}.people"\nid = "pid"\n'
        '[[relationships]]\nresource = "organization:{org}"\nrelation = "member"\n'
        'subject = "user:{pid}"\n'
    )
    table = await inspect_app_table(app_db, mapping)
    wanted = ids[1234]
    async with app_db.acquire() as conn:
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN (FORMAT TEXT) " + table.select, table.id_value(wanted), wanted
            )
        )
        records = await conn.fetch(table.select, table.id_value(wanted), wanted)
    assert "Index Scan using people_pkey on people" in plan, plan
    row = table.row(wanted, records[0])
    # Only the mapped columns, never the others (`pii`).
    assert row == {"pid": row["pid"], "org": f"org-{wanted}"} and str(row["pid"]) == wanted
    assert mapping.relationships(wanted, row) == {
        Tuple("organization", f"org-{wanted}", "member", "user", wanted)
    }


async def test_the_bookkeeping_never_goes_back_and_the_marker_only_grows(
    follow_app: FollowApp, app_spicedb: SpiceDBServer
) -> None:
    """Run the sync activity by hand, as a late attempt would, against a newer record."""
    app, uid, team = follow_app, new_user(), org()
    await app.insert(uid, team_id=team)
    table = await inspect_app_table(app.pool, parse_mapping(MAPPING.format(schema=app.schema)))
    spicedb = app_spicedb.client()
    sync = FollowedUserActivities(app.pool, spicedb, table).sync_followed_user
    try:
        first = await ActivityEnvironment().run(
            sync, SyncFollowedUserInput(user_id=uid, sync_id="s1")
        )
        assert (first.status, first.marker) == ("synced", 1)
        # A newer sync recorded marker 5 (say SpiceDB later lost its data and was re-synced).
        await app.pool.execute(
            "UPDATE spicesync_followed_users SET marker = 5, zed_token = 'newer'"
            " WHERE user_id = $1",
            uid,
        )
        # An attempt that finds nothing to change reads marker 1: it must not overwrite 5.
        late = await ActivityEnvironment().run(
            sync, SyncFollowedUserInput(user_id=uid, sync_id="s2")
        )
        assert (late.status, late.marker) == ("unchanged", 1)
        kept = await app.bookkeeping(uid)
        assert kept is not None and (kept["marker"], kept["zed_token"]) == (5, "newer")
        # The next write moves SpiceDB's marker above both, never back to a number used before.
        await app.update(uid, is_admin=True)
        moved = await ActivityEnvironment().run(
            sync, SyncFollowedUserInput(user_id=uid, sync_id="s3")
        )
        assert (moved.status, moved.marker, moved.added, moved.removed) == ("synced", 6, 1, 1)
        assert await marker_of(spicedb, uid) == ["6"]
        kept = await app.bookkeeping(uid)
        assert kept is not None and (kept["marker"], kept["zed_token"]) == (6, moved.zed_token)
    finally:
        await spicedb.close()


async def test_a_retry_after_an_unrecorded_write_reports_synced(
    follow_app: FollowApp, app_spicedb: SpiceDBServer
) -> None:
    """An attempt wrote SpiceDB and was cut off before its record (a local try that timed
    out): the next attempt finds nothing to change, but reports the sync's write and records
    it; only a sync after that is ``unchanged``."""
    app, uid, team = follow_app, new_user(), org()
    await app.insert(uid, team_id=team)
    table = await inspect_app_table(app.pool, parse_mapping(MAPPING.format(schema=app.schema)))
    spicedb = app_spicedb.client()
    sync = FollowedUserActivities(app.pool, spicedb, table).sync_followed_user
    try:
        assert (
            await ActivityEnvironment().run(sync, SyncFollowedUserInput(user_id=uid, sync_id="s1"))
        ).marker == 1
        await app.update(uid, is_admin=True)
        cut_off = SyncFollowedUserInput(user_id=uid, sync_id="s2")
        assert (await ActivityEnvironment().run(sync, cut_off)).marker == 2
        # As if the attempt had stopped between its write and its record.
        await app.pool.execute(
            "UPDATE spicesync_followed_users SET marker = 1 WHERE user_id = $1", uid
        )
        retried = await ActivityEnvironment().run(sync, cut_off)
        assert (retried.status, retried.marker, retried.added, retried.removed) == (
            "synced",
            2,
            0,
            0,
        )
        kept = await app.bookkeeping(uid)
        assert kept is not None and kept["marker"] == 2
        again = await ActivityEnvironment().run(
            sync, SyncFollowedUserInput(user_id=uid, sync_id="s3")
        )
        assert (again.status, again.marker) == ("unchanged", 2)
        assert await marker_of(spicedb, uid) == ["2"]
    finally:
        await spicedb.close()


@pytest.mark.parametrize("wait", ["accepted", "applied"])
async def test_user_changed_retries_refused_calls_until_its_deadline(
    follow_app: FollowApp, wait: Literal["accepted", "applied"]
) -> None:
    """Temporal unreachable: ``user_changed`` retries until ``accept_within``, then raises
    ChangeNotAccepted (no workflow started); a call still retrying when Temporal is back syncs."""
    app = follow_app
    async with temporal_through_proxy(app.client) as (proxy, through_proxy):
        await proxy.refuse()
        lost, team = new_user(), org()
        await app.insert(lost, team_id=team)
        with pytest.raises(ChangeNotAccepted) as refused:
            await user_changed(
                lost,
                1,
                wait=wait,
                client=through_proxy,
                task_queue=app.task_queue,
                accept_within=timedelta(seconds=3),
            )
        assert refused.value.workflow_id == followed_user_workflow_id(lost)
        with pytest.raises(RPCError):  # nothing was started
            await app.client.get_workflow_handle(followed_user_workflow_id(lost)).describe()
        assert await held_by(app.spicedb, lost) == set()

        call = asyncio.create_task(
            user_changed(
                lost,
                1,
                wait=wait,
                client=through_proxy,
                task_queue=app.task_queue,
                accept_within=timedelta(seconds=120),
            )
        )
        await asyncio.sleep(2)
        assert not call.done()
        await proxy.restore()
        await asyncio.wait_for(call, 120)

    async def synced() -> bool:
        return await held_by(app.spicedb, lost) == {f"organization:{team}#member"}

    await eventually(synced, timeout=120)
