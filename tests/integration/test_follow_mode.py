"""Follow mode end to end: an app-shaped table, the app's SpiceDB schema, a worker, real engines.

The "application" writes its own ``accounts`` table with plain SQL (in a schema of the test's
own) and says "user X changed"; the followed user's workflow brings SpiceDB in step.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

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
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from spicesync.client import user_changed
from spicesync.constants import followed_user_workflow_id
from spicesync.mapping import Tuple
from spicesync.settings import Settings
from spicesync.spicedb import (
    SpiceDBClient,
    has_org_permission,
    tuple_relationship,
    write_schema,
)
from tests.conftest import SpiceDBServer, launch_spicedb, stop_spicedb
from workers.worker import build_worker, open_resources

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
    """Syncs the user's workflow ran (activities scheduled), over every run of it."""
    count = 0
    async for execution in client.list_workflows(
        f"WorkflowId = '{followed_user_workflow_id(user_id)}'"
    ):
        history = await client.get_workflow_handle(
            execution.id, run_id=execution.run_id
        ).fetch_history()
        count += sum(
            1
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name
            == "sync_followed_user"
        )
    return count


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
