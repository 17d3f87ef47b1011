"""The real pipeline: a worker on the dev server, PostgreSQL and the SpiceDB engine over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest
from authzed.api.v1 import (
    DeleteRelationshipsRequest,
    RelationshipFilter,
    RelationshipUpdate,
    SubjectFilter,
    WriteRelationshipsRequest,
)
from temporalio.client import Client, WorkflowHistory

from chaos.faults import FAULTS_DDL
from chaos.proxy import FaultProxy
from spicesync.db import with_database
from spicesync.models import CreateUserInput, Membership
from spicesync.settings import Settings
from spicesync.spicedb import (
    SpiceDBClient,
    has_org_permission,
    membership_relationship,
    user_memberships,
)
from spicesync.stack.components import prepare_app_db
from starters.user_events import SyncOutcome, WaitFor, create_user
from tests.conftest import SpiceDBServer, launch_spicedb, stop_spicedb
from workers.worker import build_worker, open_resources

pytestmark = pytest.mark.integration


def new_event(**changes: str) -> CreateUserInput:
    """A valid event with ids and an email no other test uses."""
    user_id = str(uuid.uuid4())
    fields = {
        "user_id": user_id,
        "email": f"u-{user_id[:8]}@example.com",
        "name": "Test User",
        "org_id": f"org-{uuid.uuid4().hex[:12]}",
        "role": "member",
    } | changes
    return CreateUserInput(**fields)


@dataclass
class Pipeline:
    """A running worker and what tests need to observe its effects."""

    client: Client
    task_queue: str
    pool: asyncpg.Pool
    spicedb: SpiceDBClient


def worker_settings(database_url: str, spicedb: SpiceDBServer, key: str | None = None) -> Settings:
    return Settings(
        database_url=database_url,
        spicedb_endpoint=spicedb.endpoint,
        spicedb_preshared_key=key or spicedb.preshared_key,
        health_address="",  # in-process workers: no port to fight over
    )


@dataclass(frozen=True)
class Engines:
    """The session's engines, for a test that starts its worker itself (when, or how, it wants)."""

    client: Client
    database_url: str
    app_db: asyncpg.Pool
    spicedb_server: SpiceDBServer
    spicedb: SpiceDBClient

    @contextlib.asynccontextmanager
    async def pipeline(
        self, task_queue: str, settings: Settings | None = None
    ) -> AsyncIterator[Pipeline]:
        """A worker on ``task_queue``; tuned by ``settings`` if given, else the SDK's defaults."""
        own = settings or worker_settings(self.database_url, self.spicedb_server)
        async with (
            open_resources(own) as resources,
            build_worker(self.client, resources, task_queue=task_queue, settings=settings),
        ):
            yield Pipeline(self.client, task_queue, self.app_db, self.spicedb)


@pytest.fixture
def engines(
    client: Client,
    database_url: str,
    app_db: asyncpg.Pool,
    spicedb_server: SpiceDBServer,
    spicedb: SpiceDBClient,
) -> Engines:
    return Engines(client, database_url, app_db, spicedb_server, spicedb)


@pytest.fixture
async def pipeline(engines: Engines, task_queue: str) -> AsyncIterator[Pipeline]:
    async with engines.pipeline(task_queue) as running:
        yield running


async def user_row(pool: asyncpg.Pool, user_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM users WHERE id = $1", uuid.UUID(user_id))


async def relationships_of(spicedb: SpiceDBClient, user_id: str) -> list[tuple[str, str]]:
    return await user_memberships(spicedb, user_id)


async def grant_outside_spicesync(spicedb: SpiceDBClient, membership: Membership) -> None:
    """Write ``membership`` as something other than a sync would: no version marker."""
    await spicedb.WriteRelationships(
        WriteRelationshipsRequest(
            updates=[
                RelationshipUpdate(
                    operation=RelationshipUpdate.Operation.OPERATION_TOUCH,
                    relationship=membership_relationship(membership),
                )
            ]
        ),
        timeout=5,
    )


async def revoke_all(spicedb: SpiceDBClient, user_id: str) -> None:
    """Delete every membership of the user (its marker stays), as an operator by hand might."""
    await spicedb.DeleteRelationships(
        DeleteRelationshipsRequest(
            relationship_filter=RelationshipFilter(
                resource_type="organization",
                optional_subject_filter=SubjectFilter(
                    subject_type="user", optional_subject_id=user_id
                ),
            )
        )
    )


async def has_permission(
    spicedb: SpiceDBClient, event: CreateUserInput, permission: str, zed_token: str
) -> bool:
    return await has_org_permission(
        spicedb,
        user_id=event.user_id,
        org_id=event.org_id,
        permission=permission,
        zed_token=zed_token,
    )


async def assert_synced(pipeline: Pipeline, event: CreateUserInput, zed_token: str) -> None:
    """The row is synced with this ZedToken and SpiceDB grants exactly the role's permissions."""
    row = await user_row(pipeline.pool, event.user_id)
    assert row is not None
    assert (row["email"], row["org_id"], row["role"]) == (event.email, event.org_id, event.role)
    assert row["sync_status"] == "synced" and row["zed_token"] == zed_token
    assert await relationships_of(pipeline.spicedb, event.user_id) == [(event.org_id, event.role)]
    assert await has_permission(pipeline.spicedb, event, "view", zed_token)
    assert await has_permission(pipeline.spicedb, event, "manage", zed_token) == (
        event.role == "admin"
    )


async def assert_neither(pipeline: Pipeline, event: CreateUserInput) -> None:
    """No row and no relationship: the user exists in neither store."""
    assert await user_row(pipeline.pool, event.user_id) is None
    assert await relationships_of(pipeline.spicedb, event.user_id) == []


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float = 30.0) -> None:
    """Wait for an observable condition (a test-side probe, not part of the product)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


@dataclass
class Faults:
    """Make PostgreSQL fail one statement kind for one user, with a chosen SQLSTATE."""

    pool: asyncpg.Pool

    async def inject(self, user_id: str, op: str, sqlstate: str) -> None:
        await self.pool.execute(
            "INSERT INTO injected_faults VALUES ($1, $2, $3)", uuid.UUID(user_id), op, sqlstate
        )

    async def clear(self, user_id: str) -> None:
        await self.pool.execute(
            "DELETE FROM injected_faults WHERE user_id = $1", uuid.UUID(user_id)
        )


@pytest.fixture
async def faults(app_db: asyncpg.Pool) -> AsyncIterator[Faults]:
    """Fault injection into the real PostgreSQL (a trigger on ``users``, this test's ids only)."""
    await app_db.execute(FAULTS_DDL)
    injector = Faults(app_db)
    yield injector
    await app_db.execute("DELETE FROM injected_faults")


async def retrying(client: Client, workflow_id: str, attempts: int = 2) -> bool:
    """True once one of the workflow's pending activities is on attempt ``attempts`` or later."""
    described = await client.get_workflow_handle(workflow_id).describe()
    return any(p.attempt >= attempts for p in described.raw_description.pending_activities)


async def start_held(
    client: Client, task_queue: str, event: CreateUserInput, *, attempts: int = 2
) -> SyncOutcome:
    """Start ``event``'s sync while a store is down and wait until it is retrying, durably."""
    outcome = await create_user(event, wait=WaitFor.START, client=client, task_queue=task_queue)
    await eventually(lambda: retrying(client, outcome.workflow_id, attempts), timeout=60)
    return outcome


@dataclass
class OwnStores:
    """An App DB and a SpiceDB of this test's own, for tests that look at everything in them."""

    database_url: str
    pool: asyncpg.Pool
    server: SpiceDBServer
    spicedb: SpiceDBClient


@pytest.fixture
async def own_stores(database_url: str) -> AsyncIterator[OwnStores]:
    """A fresh, migrated database on the session's PostgreSQL and a fresh SpiceDB engine.

    Reconciliation scans whole stores, so its tests must not see other tests' users.
    """
    name = f"spicesync_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(database_url, name)
    await prepare_app_db(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=5)
    assert pool is not None
    server = await launch_spicedb()
    spicedb = server.client()
    try:
        yield OwnStores(url, pool, server, spicedb)
    finally:
        await spicedb.close()
        stop_spicedb(server)
        await pool.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def own_pipeline(
    client: Client, task_queue: str, own_stores: OwnStores
) -> AsyncIterator[Pipeline]:
    """A worker whose App DB and SpiceDB are this test's own."""
    settings = Settings(
        database_url=own_stores.database_url,
        spicedb_endpoint=own_stores.server.endpoint,
        spicedb_preshared_key=own_stores.server.preshared_key,
    )
    async with (
        open_resources(settings) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        yield Pipeline(client, task_queue, own_stores.pool, own_stores.spicedb)


@contextlib.asynccontextmanager
async def temporal_through_proxy(client: Client) -> AsyncIterator[tuple[FaultProxy, Client]]:
    """A fault proxy in front of ``client``'s Temporal server, and a client connected through it."""
    host, port = client.service_client.config.target_host.rsplit(":", 1)
    async with FaultProxy((host, int(port))) as proxy:
        through = await Client.connect(
            proxy.address, namespace=client.namespace, data_converter=client.data_converter
        )
        yield proxy, through


def local_steps(history: WorkflowHistory) -> list[str]:
    """The activity types of the local activities recorded in ``history``, in order."""
    return [step for _, step in local_step_events(history)]


def local_step_events(history: WorkflowHistory) -> list[tuple[int, str]]:
    """(event id, activity type) of each local activity recorded in ``history``."""
    steps = []
    for e in history.events:
        marker = e.marker_recorded_event_attributes
        if marker.marker_name == "core_local_activity":
            data = marker.details["data"].payloads[0].data
            steps.append((e.event_id, json.loads(data)["activity_type"]))
    return steps
