"""Follow mode's reconcile and backfill on the real engines: an application's own table (its own
column names, an app-owned relation on the same objects), drift made by hand in SpiceDB, found
exactly by a dry run and repaired through the users' workflows; the prune cap; a backfill of
pre-existing rows."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
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
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from spicesync.client import user_changed
from spicesync.constants import USER_CHANGED_SIGNAL, followed_user_workflow_id
from spicesync.db import apply_migrations, with_database
from spicesync.models import BackfillInput, ReconcileInput, ReconcileReport, UserChangedInput
from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient, write_schema
from starters.backfill import start_backfill
from starters.reconcile import start_reconcile
from tests.conftest import SpiceDBServer, launch_spicedb, stop_spicedb
from tests.integration.conftest import eventually
from tests.integration.test_follow_mode import APP_SCHEMA, MAPPING, cli_env, run_cli
from workers.worker import build_worker, open_resources

pytestmark = pytest.mark.integration

_TOUCH = RelationshipUpdate.Operation.OPERATION_TOUCH
_DELETE = RelationshipUpdate.Operation.OPERATION_DELETE

# The application's SpiceDB schema (its own `owner` relation beside the managed ones) and mapping
# are test_follow_mode's. A variant lets an organization's members also be given as a subject set
# (its owners): a check can then say "member" without the relationship itself.
SCHEMA_WITH_SUBJECT_SETS = APP_SCHEMA.replace(
    "relation member: user\n", "relation member: user | organization#owner\n", 1
)
assert SCHEMA_WITH_SUBJECT_SETS != APP_SCHEMA

# The application's own table: its own names, a PII column spicesync must never read, and no
# spicesync column.
TABLE = """
CREATE TABLE {table} (
    account_id  {id_type} PRIMARY KEY,
    email       text    NOT NULL,
    team_id     text,
    is_admin    boolean NOT NULL DEFAULT false,
    squad       text,
    squad_role  text,
    row_version bigint  NOT NULL DEFAULT 1
)
"""

Row = tuple[object, str | None, bool, str | None, str | None]


@dataclass
class Follow:
    """A worker in follow mode on a database and a SpiceDB engine of the test's own."""

    client: Client
    task_queue: str
    pool: asyncpg.Pool
    spicedb: SpiceDBClient
    server: SpiceDBServer
    database_url: str
    config: Path

    async def insert(self, *rows: Row) -> None:
        """Rows the application wrote (account id, team, admin?, squad, squad role)."""
        await self.pool.executemany(
            "INSERT INTO accounts (account_id, email, team_id, is_admin, squad, squad_role)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(i, f"person-{i}@example.com", t, a, s, r) for i, t, a, s, r in rows],
        )

    async def write(self, operation: RelationshipUpdate.Operation.ValueType, *rels: str) -> None:
        """Write relationships by hand (``type:id#relation@user:id``), as an operator might."""
        updates = [RelationshipUpdate(operation=operation, relationship=_rel(r)) for r in rels]
        await self.spicedb.WriteRelationships(WriteRelationshipsRequest(updates=updates))

    async def sync(self, *user_ids: object) -> None:
        """Sync users as a live change does (the application said they changed; waited for)."""
        for user_id in user_ids:
            await user_changed(
                str(user_id), wait="applied", client=self.client, task_queue=self.task_queue
            )

    async def status(self, user_id: object) -> str | None:
        """The user's bookkeeping status (``synced``, ``failed``), ``None`` if never synced."""
        found = await self.pool.fetchval(
            "SELECT status FROM spicesync_followed_users WHERE user_id = $1", str(user_id)
        )
        return None if found is None else str(found)

    async def settled(self, expected: set[str], failed: Sequence[object] = ()) -> None:
        """Wait until SpiceDB holds exactly ``expected`` and ``failed`` users are recorded."""

        async def check() -> bool:
            statuses = [await self.status(u) for u in failed]
            return await self.relationships() == expected and statuses == ["failed"] * len(failed)

        await eventually(check, timeout=120)

    async def relationships(self) -> set[str]:
        """Every organization and team relationship SpiceDB holds, the app's own included."""
        found: set[str] = set()
        for resource_type in ("organization", "team"):
            async for r in self.spicedb.ReadRelationships(
                ReadRelationshipsRequest(
                    consistency=Consistency(fully_consistent=True),
                    relationship_filter=RelationshipFilter(resource_type=resource_type),
                )
            ):
                rel = r.relationship
                subject_set = f"#{rel.subject.optional_relation}" * bool(
                    rel.subject.optional_relation
                )
                found.add(
                    f"{rel.resource.object_type}:{rel.resource.object_id}#{rel.relation}"
                    f"@{rel.subject.object.object_type}:{rel.subject.object.object_id}{subject_set}"
                )
        return found

    async def reconcile(self, **options: object) -> ReconcileReport:
        handle = await start_reconcile(
            ReconcileInput.model_validate({"follow": True, **options}),
            client=self.client,
            task_queue=self.task_queue,
            workflow_id=f"reconcile-{uuid.uuid4()}",
        )
        return await handle.result()

    async def changes(self, user_id: object) -> list[UserChangedInput] | None:
        """The changes signalled to a user's workflow; ``None`` if it was never started.

        A sync the test waited for (``user_changed(wait="applied")``) is an update, not a signal.
        """
        handle = self.client.get_workflow_handle(followed_user_workflow_id(str(user_id)))
        try:
            history = await handle.fetch_history()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        found: list[UserChangedInput] = []
        for event in history.events:
            if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                continue
            signal = event.workflow_execution_signaled_event_attributes
            assert signal.signal_name == USER_CHANGED_SIGNAL
            [change] = await self.client.data_converter.decode(
                signal.input.payloads, [UserChangedInput]
            )
            found.append(change)
        return found

    async def sources(self, user_ids: list[object]) -> dict[str, list[str] | None]:
        """Per user, the sources of the changes delivered to their workflow."""
        out: dict[str, list[str] | None] = {}
        for user_id in user_ids:
            changes = await self.changes(user_id)
            out[str(user_id)] = None if changes is None else [c.source for c in changes]
        return out


def _rel(text: str) -> Relationship:
    resource, _, subject = text.partition("@")
    resource_object, _, relation = resource.partition("#")
    resource_type, _, resource_id = resource_object.partition(":")
    subject_object, _, subject_relation = subject.partition("#")
    subject_type, _, subject_id = subject_object.partition(":")
    return Relationship(
        resource=ObjectReference(object_type=resource_type, object_id=resource_id),
        relation=relation,
        subject=SubjectReference(
            object=ObjectReference(object_type=subject_type, object_id=subject_id),
            optional_relation=subject_relation,
        ),
    )


async def _follow(
    client: Client,
    task_queue: str,
    database_url: str,
    tmp_path: Path,
    id_type: str,
    schema: str = APP_SCHEMA,
) -> AsyncIterator[Follow]:
    name = f"spicesync_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(database_url, name)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(TABLE.format(table="accounts", id_type=id_type))
        # Follow mode's migrations only: spicesync's own `users` table is never created.
        await apply_migrations(conn, owned=False)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=5)
    assert pool is not None
    server = await launch_spicedb()
    spicedb = server.client()
    await write_schema(spicedb, schema)
    mapping = tmp_path / "spicesync.toml"
    mapping.write_text(MAPPING.format(schema="public"))
    settings = Settings(
        database_url=url,
        spicedb_endpoint=server.endpoint,
        spicedb_preshared_key=server.preshared_key,
        config_path=mapping,
    )
    try:
        async with (
            open_resources(settings) as resources,
            build_worker(client, resources, task_queue=task_queue, settings=settings),
        ):
            yield Follow(client, task_queue, pool, spicedb, server, url, mapping)
    finally:
        await spicedb.close()
        stop_spicedb(server)
        await pool.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def follow(
    client: Client, task_queue: str, database_url: str, tmp_path: Path
) -> AsyncIterator[Follow]:
    """Follow mode on an application table keyed by bigint."""
    async for f in _follow(client, task_queue, database_url, tmp_path, "bigint"):
        yield f


@pytest.fixture
async def follow_subject_sets(
    client: Client, task_queue: str, database_url: str, tmp_path: Path
) -> AsyncIterator[Follow]:
    """Follow mode where a managed relation may also be reached through a subject set."""
    async for f in _follow(
        client, task_queue, database_url, tmp_path, "bigint", SCHEMA_WITH_SUBJECT_SETS
    ):
        yield f


@pytest.fixture
async def follow_uuid(
    client: Client, task_queue: str, database_url: str, tmp_path: Path
) -> AsyncIterator[Follow]:
    """Follow mode on an application table keyed by uuid."""
    async for f in _follow(client, task_queue, database_url, tmp_path, "uuid"):
        yield f


def _ids(count: int) -> list[int]:
    """Account ids no other test uses (workflow ids are shared by the session's Temporal)."""
    base = random.randrange(10**12, 10**15) * 100
    return [base + i for i in range(1, count + 1)]


async def test_follow_reconcile_finds_exactly_the_drift_and_repairs_it(follow: Follow) -> None:
    f = follow
    admin_, member, owner_held, unmappable, extra, ghost = _ids(6)
    await f.insert(
        (admin_, "org-a", True, "alpha", "lead"),
        (member, "org-a", False, "alpha", "member"),
        (owner_held, "org-b", False, None, None),
        (extra, "org-c", False, None, None),
    )
    await f.sync(admin_, member, owner_held, extra)
    mapped = {
        f"organization:org-a#admin@user:{admin_}",
        f"team:alpha#lead@user:{admin_}",
        f"organization:org-a#member@user:{member}",
        f"team:alpha#member@user:{member}",
        f"organization:org-b#member@user:{owner_held}",
        f"organization:org-c#member@user:{extra}",
    }
    assert await f.relationships() == mapped
    # A row whose value is no valid SpiceDB object id, inserted with no change announced.
    await f.insert((unmappable, "bad id!", False, None, None))
    # The drift, by hand: a managed relationship deleted, one for a user without a row, one
    # the row does not imply; and the application's own relation on a managed object.
    await f.write(_DELETE, f"team:alpha#member@user:{member}")
    await f.write(_TOUCH, f"organization:org-a#member@user:{ghost}")
    await f.write(_TOUCH, f"team:gamma#lead@user:{extra}")
    app_owned = f"organization:org-b#owner@user:{owner_held}"
    await f.write(_TOUCH, app_owned)
    before = await f.relationships()

    dry = await f.reconcile(dry_run=True)

    assert dry.found.model_dump() == {
        "missing": 1,
        "mismatched": 0,
        "orphan": 1,
        "unfinished": 0,
        "unsynced": 0,
        "extra": 1,
        "unmappable": 1,
    }
    assert dry.samples == {
        "missing": [str(member)],
        "orphan": [str(ghost)],
        "extra": [str(extra)],
        "unmappable": [str(unmappable)],
    }
    assert dry.rows_scanned == 5
    # Every organization and team relationship to a user, the app's owner included.
    assert dry.relationships_scanned == len(before) == 8
    assert dry.deletions_planned == 1 and not dry.prune_cap_exceeded
    assert dry.repairs.delivered == 0
    everyone = [admin_, member, owner_held, unmappable, extra, ghost]
    # The live syncs came as waited-for updates, so no signal yet.
    live = {str(u): [] for u in (admin_, member, owner_held, extra)}
    assert await f.sources(everyone) == live | {str(unmappable): None, str(ghost): None}
    assert await f.relationships() == before
    saved = await f.pool.fetch("SELECT dry_run, report FROM spicesync_reconcile_reports")
    assert [r["dry_run"] for r in saved] == [True]

    applied = await f.reconcile(dry_run=False)

    assert applied.found == dry.found and applied.samples == dry.samples
    assert applied.repairs.delivered == 4 and applied.repairs.failed == 0
    # Each drifted user's workflow got one change from the reconcile; nobody else's.
    assert await f.sources(everyone) == {
        str(admin_): [],
        str(member): ["reconcile"],
        str(owner_held): [],
        str(unmappable): ["reconcile"],
        str(extra): ["reconcile"],
        str(ghost): ["reconcile"],
    }
    # The users' workflows make SpiceDB equal to the mapping; the app's relation stays; the
    # unmappable row is recorded as failed (nothing of it reaches SpiceDB or leaves the table).
    await f.settled(mapped | {app_owned}, failed=[unmappable])
    assert await f.pool.fetchval("SELECT count(*) FROM accounts") == 5
    reports = await f.pool.fetch(
        "SELECT dry_run, report->'repairs'->>'delivered' AS delivered"
        " FROM spicesync_reconcile_reports ORDER BY finished_at"
    )
    assert [(r["dry_run"], r["delivered"]) for r in reports] == [(True, "0"), (False, "4")]
    # Follow mode never creates or changes a `users` table.
    assert await f.pool.fetchval("SELECT to_regclass('users')") is None

    again = await f.reconcile(dry_run=True)
    assert again.found.total() == 1 and again.samples == {"unmappable": [str(unmappable)]}


async def test_follow_reconcile_prune_cap_spares_users_who_would_lose_everything(
    follow: Follow,
) -> None:
    f = follow
    kept, lacking, emptied, *ghosts = _ids(5)
    await f.insert(
        (kept, "org-a", False, None, None),
        (lacking, "org-a", True, None, None),
        (emptied, "org-x", False, "beta", "member"),
    )
    await f.sync(kept, lacking, emptied)
    await f.write(_DELETE, f"organization:org-a#admin@user:{lacking}")
    # The application empties a row without announcing it: SpiceDB still holds its two.
    await f.pool.execute(
        "UPDATE accounts SET team_id = NULL, squad = NULL WHERE account_id = $1", emptied
    )
    orphaned = {f"organization:org-a#member@user:{g}" for g in ghosts}
    await f.write(_TOUCH, *orphaned)

    report = await f.reconcile(dry_run=False, prune_cap=3)

    assert (report.found.missing, report.found.extra, report.found.orphan) == (1, 1, 2)
    # Two orphans' one relationship each and the emptied user's two: four deletions, cap three.
    assert report.deletions_planned == 4 and report.prune_cap_exceeded
    assert "prune cap exceeded" in report.message
    # The missing relationship is still repaired; nobody who would lose everything is touched.
    assert report.repairs.delivered == 1
    assert await f.sources([kept, lacking, emptied, *ghosts]) == {
        str(kept): [],
        str(lacking): ["reconcile"],
        str(emptied): [],
        **{str(g): None for g in ghosts},
    }
    await f.settled(
        {
            f"organization:org-a#member@user:{kept}",
            f"organization:org-a#admin@user:{lacking}",
            f"organization:org-x#member@user:{emptied}",
            f"team:beta#member@user:{emptied}",
            *orphaned,
        }
    )


async def test_follow_reconcile_reads_what_a_check_cannot_prove(
    follow_subject_sets: Follow,
) -> None:
    f = follow_subject_sets
    [owner] = _ids(1)
    await f.insert((owner, "org-a", False, None, None))
    await f.sync(owner)
    # The application makes its owners members through a subject set, and this user an owner;
    # spicesync's own `member` relationship is gone. A permission check says "member" anyway.
    await f.write(
        _TOUCH,
        "organization:org-a#member@organization:org-a#owner",
        f"organization:org-a#owner@user:{owner}",
    )
    await f.write(_DELETE, f"organization:org-a#member@user:{owner}")

    dry = await f.reconcile(dry_run=True)

    assert (dry.found.total(), dry.samples) == (1, {"missing": [str(owner)]})
    applied = await f.reconcile(dry_run=False)
    assert applied.repairs.delivered == 1
    await f.settled(
        {
            f"organization:org-a#member@user:{owner}",
            f"organization:org-a#owner@user:{owner}",
            "organization:org-a#member@organization:org-a#owner",
        }
    )


async def test_follow_backfill_syncs_every_user_spicesync_never_synced(
    follow_uuid: Follow,
) -> None:
    f = follow_uuid
    users = [uuid.uuid4() for _ in range(30)]
    rows = [(u, f"org-{i % 4}", i % 5 == 0, None, None) for i, u in enumerate(users)]
    await f.insert(*rows)
    already = users[:10]
    await f.sync(*already)

    handle = await start_backfill(
        BackfillInput(follow=True, batch_size=7, max_rate=200.0, lanes=3),
        client=f.client,
        task_queue=f.task_queue,
        workflow_id=f"backfill-{uuid.uuid4()}",
    )
    result = await handle.result()

    p = result.progress
    assert (p.total, p.scanned, p.delivered, p.skipped) == (30, 30, 20, 10)
    assert p.written_users == 0 and p.relationships_written == 0
    sources = await f.sources(list(users))
    assert sources == {str(u): [] if u in already else ["backfill"] for u in users}
    # Every user synced by their workflows: SpiceDB equals the mapping, the bookkeeping says so.
    await f.settled(
        {f"organization:{o}#{'admin' if a else 'member'}@user:{u}" for u, o, a, _, _ in rows}
    )
    assert [await f.status(u) for u in users] == ["synced"] * 30


async def test_follow_reconcile_and_backfill_from_the_command_line(
    follow: Follow,
    temporal_env: WorkflowEnvironment,
    test_codec_keys: str,
    tmp_path: Path,
) -> None:
    f = follow
    env = cli_env(
        temporal_env,
        test_codec_keys,
        f.task_queue,
        f.database_url,
        f.server,
        f.config,
        tmp_path / "state",
    )
    users = _ids(3)
    rows = [(u, "org-a", False, None, None) for u in users]
    await f.insert(*rows)

    # Rows from before spicesync: the reconcile says so and points at the backfill.
    code, out, _ = await run_cli(env, "reconcile", "--json")
    assert code == 0
    report = ReconcileReport.model_validate_json(out)
    assert report.found.unsynced == 3 and "spicesync backfill" in report.message

    code, out, _ = await run_cli(env, "backfill", "--json")
    assert code == 0 and json.loads(out)["changes_delivered"] == 3
    await f.settled({f"organization:org-a#member@user:{u}" for u in users})

    # The application deletes a row and forgets to say so: an orphan, repaired on --apply.
    await f.pool.execute("DELETE FROM accounts WHERE account_id = $1", users[0])
    code, out, _ = await run_cli(env, "reconcile", "--apply")
    assert code == 0
    assert "orphan 1" in out and "1 changes delivered to the users' workflows" in out
    await f.settled({f"organization:org-a#member@user:{u}" for u in users[1:]})

    # A broken mapping is refused in one line naming the key, before anything starts.
    broken = tmp_path / "broken.toml"
    broken.write_text(f.config.read_text().replace('id = "account_id"', 'id = "account id"'))
    code, out, err = await run_cli(env | {"SPICESYNC_CONFIG": str(broken)}, "reconcile")
    assert code == 2 and "source.id" in err and out == ""
