"""The transactional outbox (issue 12, item 4): an application's transaction writes its own row
and a ``spicesync_outbox`` row with plain SQL; ``spicesync relay outbox`` delivers every change
to the user's workflow and deletes a row only after Temporal accepted it; a follow-mode worker
brings SpiceDB in step. Real PostgreSQL, real Temporal dev servers, the real SpiceDB engine, the
relay as a process of its own.

Deliveries are read from Temporal itself (the ``user_changed`` signals in each user's workflow
history: Temporal accepted each one); SpiceDB is read independently of spicesync's bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from chaos.engines import TemporalServer
from chaos.proxy import FaultProxy, postgres_route
from spicesync.client import user_changed
from spicesync.codec import EncryptionCodec, encrypted_data_converter
from spicesync.constants import USER_CHANGED_SIGNAL, followed_user_workflow_id
from spicesync.db import apply_migrations, with_database
from spicesync.models import UserChangedInput
from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient, read_user_snapshot
from spicesync.stack.processes import free_port
from tests.conftest import SpiceDBServer
from tests.integration.conftest import eventually
from tests.integration.test_worker_lifecycle import get_json
from workers.outbox_relay import LISTEN_APPLICATION_NAME
from workers.worker import build_worker, open_resources

pytestmark = pytest.mark.integration

# The application's own table: spicesync never writes it.
_APP_TABLE = """
CREATE TABLE accounts (
    account_id  text    PRIMARY KEY,
    team_id     text    NOT NULL,
    is_admin    boolean NOT NULL DEFAULT false,
    row_version bigint  NOT NULL DEFAULT 1
)
"""
_SAVE_ACCOUNT = """
INSERT INTO accounts (account_id, team_id, is_admin) VALUES ($1, $2, $3)
ON CONFLICT (account_id) DO UPDATE
    SET team_id = EXCLUDED.team_id,
        is_admin = EXCLUDED.is_admin,
        row_version = accounts.row_version + 1
RETURNING row_version
"""
# The one statement an application adds to its transaction (docs/follow-mode.md#outbox).
_OUTBOX_INSERT = "INSERT INTO spicesync_outbox (user_id, version) VALUES ($1, $2)"
# The application's mapping: a team admin or member of the team's organization.
_MAPPING = """
[source]
table = "accounts"
id = "account_id"
version = "row_version"

[[relationships]]
resource = "organization:{team_id}"
relation = "admin"
subject = "user:{account_id}"
when = "is_admin"

[[relationships]]
resource = "organization:{team_id}"
relation = "member"
subject = "user:{account_id}"
unless = "is_admin"
"""


@dataclass
class AppDB:
    """A database of the test's own: the app's table and spicesync's follow-mode tables."""

    url: str
    pool: asyncpg.Pool

    async def save(
        self,
        account_id: str,
        *,
        team_id: str = "team-a",
        admin: bool = False,
        versioned: bool = True,
    ) -> int:
        """The application's transaction: its own write and the outbox row, or neither.

        ``versioned=False``: the outbox row carries no version (every delivery of it syncs).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            version = int(await conn.fetchval(_SAVE_ACCOUNT, account_id, team_id, admin))
            await conn.execute(_OUTBOX_INSERT, account_id, version if versioned else None)
        return version

    async def outbox_rows(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM spicesync_outbox"))

    async def outbox_empty(self) -> bool:
        return await self.outbox_rows() == 0


async def in_step(app_db: AppDB, spicedb: SpiceDBClient, user_ids: list[str]) -> bool:
    """Whether SpiceDB holds exactly what each user's row implies (read fully consistently)."""
    for user_id in user_ids:
        row = await app_db.pool.fetchrow(
            "SELECT team_id, is_admin FROM accounts WHERE account_id = $1", user_id
        )
        want = [] if row is None else [(row["team_id"], "admin" if row["is_admin"] else "member")]
        snapshot = await read_user_snapshot(spicedb, user_id)
        if [(m.org_id, m.role) for m in snapshot.memberships] != want:
            return False
    return True


async def spicedb_marker(spicedb: SpiceDBClient, user_id: str) -> int | None:
    """The user's marker in SpiceDB: every spicesync write moves it by one."""
    return (await read_user_snapshot(spicedb, user_id)).marker


@contextlib.asynccontextmanager
async def follow_worker(
    client: Client, app_db: AppDB, spicedb: SpiceDBServer, task_queue: str, directory: Path
) -> AsyncIterator[None]:
    """A follow-mode worker on the app's table (the mapping above), in this process."""
    mapping = directory / "spicesync.toml"
    mapping.write_text(_MAPPING)
    settings = Settings(
        database_url=app_db.url,
        spicedb_endpoint=spicedb.endpoint,
        spicedb_preshared_key=spicedb.preshared_key,
        config_path=mapping,
        _env_file=None,
    )
    async with (
        open_resources(settings) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        yield


@pytest.fixture
async def app_db(database_url: str) -> AsyncIterator[AppDB]:
    """A fresh database: a relay claims the whole outbox, so no test may share one."""
    name = f"spicesync_outbox_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(database_url, name)
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn, owned=False)
        await conn.execute(_APP_TABLE)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=8)
    assert pool is not None
    try:
        yield AppDB(url, pool)
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


def _new_ids(count: int) -> list[str]:
    return [f"acct-{uuid.uuid4().hex[:16]}" for _ in range(count)]


@dataclass
class Relays:
    """``spicesync relay outbox`` processes of one test, on one Temporal and one database."""

    temporal_address: str
    app_db: AppDB
    spicedb: SpiceDBServer
    keys: str
    task_queue: str
    directory: Path
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    # The relays' way to the database, when not the app's own (through a fault proxy, say).
    database_url: str | None = None

    def env(self, extra: dict[str, str] | None = None, **outbox: str) -> dict[str, str]:
        """A relay's whole configuration: the worker's, the ``SPICESYNC_OUTBOX_*`` tuning, extra."""
        settings = Settings(
            temporal_address=self.temporal_address,
            encryption_keys=SecretStr(self.keys),
            _env_file=None,
        )
        env = settings.worker_environment(
            task_queue=self.task_queue,
            database_url=self.database_url or self.app_db.url,
            spicedb_endpoint=self.spicedb.endpoint,
            spicedb_key=self.spicedb.preshared_key,
        )
        tuning = {
            "POLL_SECONDS": "1",
            "RPC_TIMEOUT_SECONDS": "5",
            "METRICS_ADDRESS": "",
            "HEALTH_ADDRESS": "",
        }
        tuning |= {key.upper(): value for key, value in outbox.items()}
        env |= {f"SPICESYNC_OUTBOX_{key}": value for key, value in tuning.items()}
        return env | {"SPICESYNC_TRACE_FILE": str(self.directory / "traces.jsonl")} | (extra or {})

    async def start(
        self,
        *module: str,
        log: str = "relay.log",
        extra: dict[str, str] | None = None,
        **outbox: str,
    ) -> asyncio.subprocess.Process:
        """Start ``python -m spicesync relay outbox`` (or ``module``), logging to ``log``."""
        command = module or ("spicesync", "relay", "outbox")
        with open(self.directory / log, "ab") as out:  # noqa: ASYNC230 - opened once
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                *command,
                env=self.env(extra, **outbox),
                stdout=out,
                stderr=out,
            )
        self.processes.append(process)
        return process

    def log(self, name: str = "relay.log") -> str:
        return (self.directory / name).read_text(encoding="utf-8", errors="replace")

    async def stop_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.fixture
async def relays(
    temporal_env: WorkflowEnvironment,
    app_db: AppDB,
    spicedb_server: SpiceDBServer,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> AsyncIterator[Relays]:
    """Relays, and a follow-mode worker, on the session's Temporal dev server."""
    address = temporal_env.client.service_client.config.target_host
    relays = Relays(address, app_db, spicedb_server, test_codec_keys, task_queue, tmp_path)
    try:
        async with follow_worker(temporal_env.client, app_db, spicedb_server, task_queue, tmp_path):
            yield relays
    finally:
        await relays.stop_all()


async def user_changed_signals(client: Client, user_id: str) -> list[UserChangedInput]:
    """The ``user_changed`` signals the user's workflow holds (Temporal accepted each one)."""
    handle = client.get_workflow_handle(followed_user_workflow_id(user_id))
    try:
        history = await handle.fetch_history()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return []
        raise
    signals = []
    for event in history.events:
        if not event.HasField("workflow_execution_signaled_event_attributes"):
            continue
        attributes = event.workflow_execution_signaled_event_attributes
        if attributes.signal_name == USER_CHANGED_SIGNAL:
            [change] = await client.data_converter.decode(
                attributes.input.payloads, [UserChangedInput]
            )
            signals.append(change)
    return signals


async def all_delivered(client: Client, user_ids: list[str]) -> bool:
    for user_id in user_ids:
        if not await user_changed_signals(client, user_id):
            return False
    return True


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def metric(page: str, name: str) -> float:
    """The sum of a metric's samples on a Prometheus page (0 when it has none)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(page))


async def metrics_page(address: str) -> str:
    return await asyncio.to_thread(_scrape, f"http://{address}/metrics")


async def test_the_relay_delivers_what_the_app_wrote_in_its_transaction(
    relays: Relays, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """Rows written before the relay starts are delivered once per user (a user's three rows
    coalesce into one change carrying the newest version; a row whose id is not an opaque id is
    deleted with an error naming its seq, not the id); rows written while it waits are
    delivered at once on NOTIFY (it would otherwise poll only every 10 minutes), also after its
    LISTEN connection was cut; SIGTERM stops it with exit status 0. SpiceDB ends up holding
    what every row implies."""
    earlier = _new_ids(10)
    for user_id in earlier:
        await app_db.save(user_id)
    busy = earlier[0]
    await app_db.save(busy, admin=True)
    await app_db.save(busy, team_id="team-b")  # three rows, version 3
    # An id no workflow can be named after (an app that keys its users by email, say).
    poison = "someone@example.com"
    await app_db.pool.execute(_OUTBOX_INSERT, poison, 1)
    relay = await relays.start(POLL_SECONDS="600")

    await eventually(app_db.outbox_empty, timeout=60)
    assert await all_delivered(client, earlier)
    for user_id in earlier:
        [change] = await user_changed_signals(client, user_id)
        assert change.source == "outbox"
        assert change.version == (3 if user_id == busy else 1)
        assert change.position is not None and change.position.startswith("outbox:")

    later = _new_ids(5)
    for user_id in later:
        await app_db.save(user_id)
    await eventually(lambda: all_delivered(client, later), timeout=60)
    await eventually(app_db.outbox_empty, timeout=60)

    # Cut the LISTEN connection: the relay opens another (its reopening wakes it: with a
    # 10-minute poll, nothing else would deliver the next row), and is woken on it again.
    cut = await app_db.pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = $1",
        LISTEN_APPLICATION_NAME,
    )
    assert cut == 1
    after_cut = _new_ids(2)
    for user_id in after_cut:
        await app_db.save(user_id)
        await eventually(lambda: all_delivered(client, [user_id]), timeout=60)  # noqa: B023
    await eventually(app_db.outbox_empty, timeout=60)

    everyone = earlier + later + after_cut
    await eventually(lambda: in_step(app_db, spicedb, everyone), timeout=180)
    [busy_change] = await user_changed_signals(client, busy)
    kept = await app_db.pool.fetchrow(
        "SELECT applied_version, applied_position FROM spicesync_followed_users WHERE user_id = $1",
        busy,
    )
    assert kept is not None
    assert (kept["applied_version"], kept["applied_position"]) == (3, busy_change.position)

    relay.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(relay.wait(), 60) == 0
    log = relays.log()
    assert "the LISTEN connection is down" in log
    assert "outbox relay stopped" in log
    # The poison row was deleted undelivered, named by its seq only.
    assert "deleted undelivered" in log and poison not in log


async def _closed_runs(client: Client, user_id: str) -> int:
    """How many of the user's workflow runs have completed."""
    query = f"WorkflowId = '{followed_user_workflow_id(user_id)}' AND ExecutionStatus = 'Completed'"
    return len([execution async for execution in client.list_workflows(query)])


async def test_with_no_idle_time_each_delivery_syncs_and_closes_its_run(
    relays: Relays, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """``SPICESYNC_FOLLOW_IDLE_SECONDS=0``: every run the relay starts closes with its sync, and
    a later change of the same user starts a new run that does the same."""
    users = _new_ids(5)
    for user_id in users:
        await app_db.save(user_id)
    await relays.start(extra={"SPICESYNC_FOLLOW_IDLE_SECONDS": "0"})
    await eventually(lambda: in_step(app_db, spicedb, users), timeout=120)

    async def all_closed(count: int) -> bool:
        return all([await _closed_runs(client, u) == count for u in users])

    await eventually(lambda: all_closed(1), timeout=60)
    for user_id in users:
        await app_db.save(user_id, admin=True)
    await eventually(lambda: in_step(app_db, spicedb, users), timeout=120)
    # Each change came after its user's first run had closed: a second run, closed too.
    await eventually(lambda: all_closed(2), timeout=60)


async def test_a_relay_killed_between_accept_and_delete_loses_nothing(
    relays: Relays, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """SIGKILL after Temporal accepted the batch, before the delete: the rows stay (their
    transaction died with the process) while the worker syncs the delivered changes; a
    restarted relay delivers them again and empties the outbox. No change was lost, and the
    duplicates made no SpiceDB write: each user's marker moved once (a redelivered change with
    a version already synced needs no sync; one without a version syncs and finds nothing to
    write)."""
    users = _new_ids(30)
    versionless = set(users[::2])
    for user_id in users:
        await app_db.save(user_id, versioned=user_id not in versionless)
    dying = await relays.start("tests.integration.relay_dies_before_delete", "kill")
    assert await asyncio.wait_for(dying.wait(), 120) == -signal.SIGKILL
    assert await app_db.outbox_rows() == 30  # the delete never happened
    for user_id in users:  # ... after Temporal had accepted every change
        assert len(await user_changed_signals(client, user_id)) == 1
    await eventually(lambda: in_step(app_db, spicedb, users), timeout=180)
    for user_id in users:
        assert await spicedb_marker(spicedb, user_id) == 1

    await relays.start()
    await eventually(app_db.outbox_empty, timeout=120)
    for user_id in users:
        delivered = await user_changed_signals(client, user_id)
        version = None if user_id in versionless else 1
        assert [(c.version, c.source) for c in delivered] == [(version, "outbox")] * 2
    for user_id in users:
        # Returns once a sync that began after every signal so far has finished: the
        # redelivered change has been handled by then.
        outcome = await user_changed(
            user_id, wait="applied", client=client, task_queue=relays.task_queue
        )
        assert outcome.status == "unchanged"
        assert await spicedb_marker(spicedb, user_id) == 1
    assert await in_step(app_db, spicedb, users)


async def test_sigterm_mid_batch_finishes_the_batch_and_exits_0(
    relays: Relays, app_db: AppDB, client: Client
) -> None:
    """SIGTERM arriving after Temporal accepted the batch: the relay still deletes the batch's
    rows, then exits 0; nothing is delivered twice."""
    users = _new_ids(10)
    for user_id in users:
        await app_db.save(user_id)
    stopping = await relays.start("tests.integration.relay_dies_before_delete", "term")
    assert await asyncio.wait_for(stopping.wait(), 120) == 0
    assert await app_db.outbox_empty()
    for user_id in users:
        assert len(await user_changed_signals(client, user_id)) == 1
    assert "shutting down: finishing the batch in hand" in relays.log()


async def test_two_relays_side_by_side_deliver_every_row_once(
    relays: Relays, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """Two relays, small batches, 300 users written by concurrent app transactions: the outbox
    empties, every user's change is delivered exactly once (SKIP LOCKED: no row is claimed by
    both), the two relays' counters add up to the rows, and SpiceDB follows every row."""
    metrics = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    for n, address in enumerate(metrics):
        await relays.start(log=f"relay-{n}.log", BATCH_SIZE="25", METRICS_ADDRESS=address)
    users = _new_ids(300)
    gate = asyncio.Semaphore(6)

    async def save(user_id: str) -> None:
        async with gate:
            await app_db.save(user_id)

    await asyncio.gather(*(save(user_id) for user_id in users))
    await eventually(app_db.outbox_empty, timeout=180)
    for user_id in users:
        assert len(await user_changed_signals(client, user_id)) == 1

    async def counted() -> bool:
        pages = [await metrics_page(address) for address in metrics]
        return sum(metric(p, "spicesync_outbox_rows_deleted") for p in pages) == len(users)

    await eventually(counted, timeout=60)
    await eventually(lambda: in_step(app_db, spicedb, users), timeout=300)


async def test_temporal_down_rows_wait_in_the_outbox_then_are_delivered(
    app_db: AppDB,
    spicedb: SpiceDBClient,
    spicedb_server: SpiceDBServer,
    test_codec: EncryptionCodec,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    """Temporal crashes while the app keeps writing: the rows wait in the outbox (the backlog
    and the oldest row's age show on /metrics), the relay logs the outage once however often it
    retries, and once Temporal is back every change is delivered, the outbox empties and
    SpiceDB follows every row (the worker rode out the outage)."""
    temporal = TemporalServer(tmp_path)
    await temporal.start()
    relays = Relays(temporal.address, app_db, spicedb_server, test_codec_keys, task_queue, tmp_path)
    metrics = f"127.0.0.1:{free_port()}"
    worker = contextlib.AsyncExitStack()
    try:
        temporal_client = await Client.connect(
            temporal.address, data_converter=encrypted_data_converter(test_codec)
        )
        await worker.enter_async_context(
            follow_worker(temporal_client, app_db, spicedb_server, task_queue, tmp_path)
        )
        await relays.start(METRICS_ADDRESS=metrics)
        before = _new_ids(10)
        for user_id in before:
            await app_db.save(user_id)
        await eventually(lambda: all_delivered(temporal_client, before), timeout=60)
        await eventually(app_db.outbox_empty, timeout=60)

        temporal.kill()
        during = _new_ids(20)
        for user_id in during:
            await app_db.save(user_id)

        async def lag_shown() -> bool:
            page = await metrics_page(metrics)
            return (
                metric(page, "spicesync_outbox_backlog") == len(during)
                and metric(page, "spicesync_outbox_oldest_age_seconds") > 0
                # Retried more than once while Temporal was down.
                and metric(page, "spicesync_outbox_delivery_failures") >= 2
            )

        await eventually(lag_shown, timeout=120)
        assert await app_db.outbox_rows() == len(during)  # nothing deleted undelivered

        await temporal.start()
        await eventually(app_db.outbox_empty, timeout=180)
        assert await all_delivered(temporal_client, before + during)
        for user_id in during:
            [change] = await user_changed_signals(temporal_client, user_id)
            assert (change.version, change.source) == (1, "outbox")

        async def lag_gone() -> bool:
            page = await metrics_page(metrics)
            return (
                metric(page, "spicesync_outbox_backlog") == 0
                and metric(page, "spicesync_outbox_oldest_age_seconds") == 0
            )

        await eventually(lag_gone, timeout=60)
        await eventually(lambda: in_step(app_db, spicedb, before + during), timeout=180)
        log = relays.log()
        assert log.count("Temporal is not accepting changes") == 1
        assert log.count("Temporal accepts changes again") == 1
    finally:
        await relays.stop_all()
        await worker.aclose()
        temporal.kill()


async def test_postgresql_down_the_relay_waits_then_delivers(
    relays: Relays, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """The relay's connections to PostgreSQL are reset and refused for a while (a fault proxy
    between them): it says so once, retries with backoff, and once PostgreSQL is reachable
    again it delivers what was written meanwhile, LISTENing on a new connection. Its /readyz
    says so meanwhile: 503 naming postgres, then 200 again (issue 14; nothing listened before)."""
    target, through = postgres_route(app_db.url)
    health = f"127.0.0.1:{free_port()}"

    async def ready(postgres: str) -> bool:
        status, body = await asyncio.to_thread(get_json, f"http://{health}/readyz")
        checks = body.get("checks", {})
        return (
            status == (200 if postgres == "ok" else 503)
            and checks.get("temporal") == "ok"
            and checks.get("postgres", "").startswith(postgres)
        )

    async with FaultProxy(target) as proxy:
        relays.database_url = through(proxy.port)
        await relays.start(health_address=health)
        await eventually(lambda: ready("ok"), timeout=60)
        first = _new_ids(5)
        for user_id in first:
            await app_db.save(user_id)
        await eventually(lambda: all_delivered(client, first), timeout=60)
        await eventually(app_db.outbox_empty, timeout=60)

        await proxy.refuse()
        during = _new_ids(10)
        for user_id in during:
            await app_db.save(user_id)  # the app's own way to PostgreSQL still works
        await eventually(lambda: _logged(relays, "PostgreSQL is unavailable"), timeout=60)
        await eventually(lambda: ready("failed"), timeout=60)
        assert (await asyncio.to_thread(get_json, f"http://{health}/livez"))[0] == 200
        await asyncio.sleep(3)  # an outage of a few retries
        assert await app_db.outbox_rows() == len(during)
        assert not await user_changed_signals(client, during[0])

        await proxy.restore()
        await eventually(app_db.outbox_empty, timeout=120)
        await eventually(lambda: ready("ok"), timeout=60)
        assert await all_delivered(client, during)
        await eventually(lambda: _logged(relays, "listening for outbox rows again"), timeout=60)
        after = _new_ids(1)
        await app_db.save(after[0])
        await eventually(lambda: all_delivered(client, after), timeout=60)
        # Read before the proxy closes: closing it resets the relay's connections, a second
        # outage of the test's own making.
        log = relays.log()
    await eventually(lambda: in_step(app_db, spicedb, first + during + after), timeout=180)
    assert log.count("PostgreSQL is unavailable") == 1
    assert log.count("PostgreSQL is available again") == 1


async def _logged(relays: Relays, text: str) -> bool:
    return text in relays.log()


async def test_a_relay_started_without_the_outbox_table_refuses_to_start(
    relays: Relays, app_db: AppDB
) -> None:
    """No migrations applied: exit status 2 and a line saying what to run."""
    await app_db.pool.execute("DROP TABLE spicesync_outbox")
    relay = await relays.start()
    assert await asyncio.wait_for(relay.wait(), 60) == 2
    assert "spicesync migrate" in relays.log()
