"""Change data capture (issue 13, item 1): the application writes its own table with plain SQL
only (no outbox, no spicesync call); ``spicesync relay cdc`` reads the table's committed changes
from a logical replication slot and a follow-mode worker brings SpiceDB in step.

Real engines throughout: a PostgreSQL of this module's own with ``wal_level = logical`` (the
embedded one, which the local stack runs the same way; the tests restart it), the session's
Temporal dev server, a SpiceDB engine of each test's own (a reconcile scans all of SpiceDB), and
the relay as a process of its own (``python -m spicesync relay cdc``), killed with SIGKILL.
SpiceDB is read independently of spicesync's bookkeeping; the slot's position from
``pg_replication_slots``."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from spicesync.constants import CDC_RECONCILE_WORKFLOW_PREFIX
from spicesync.db import apply_migrations, with_database
from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient
from spicesync.stack.components import (
    restart_embedded_postgres,
    start_embedded_postgres,
    stop_embedded_postgres,
)
from spicesync.stack.processes import free_port
from tests.conftest import SpiceDBServer, launch_spicedb, stop_spicedb
from tests.integration.conftest import eventually
from tests.integration.test_outbox_relay import (
    _APP_TABLE,
    AppDB,
    follow_worker,
    in_step,
    metric,
    metrics_page,
)

# Each test starts relays and a SpiceDB of its own on a loaded box.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

# The application's plain SQL: nothing of spicesync's in its transactions.
_INSERT = "INSERT INTO accounts (account_id, team_id, is_admin) VALUES ($1, $2, $3)"
_UPDATE = (
    "UPDATE accounts SET team_id = $2, is_admin = $3, row_version = row_version + 1"
    " WHERE account_id = $1"
)
_DELETE = "DELETE FROM accounts WHERE account_id = $1"
# Generous: the box runs other suites and a demo stack beside these tests.
_SYNCED_WITHIN = 150.0


@dataclass(frozen=True)
class LogicalPostgres:
    """A PostgreSQL server of this module's own: its data folder and its URL."""

    data_dir: Path
    url: str

    def stop(self) -> None:
        stop_embedded_postgres(self.data_dir)

    def start(self) -> None:
        assert restart_embedded_postgres(self.data_dir) == self.url

    def restart(self) -> None:
        self.start()  # stops it first


@pytest.fixture(scope="module")
def logical_pg() -> Iterator[LogicalPostgres]:
    """A PostgreSQL of this module's own (logical WAL), which its tests may restart."""
    data_dir = Path(tempfile.mkdtemp(prefix="spicesync-cdc-pg-")) / "data"
    yield LogicalPostgres(data_dir, start_embedded_postgres(data_dir))
    stop_embedded_postgres(data_dir)
    shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture
async def cdc_db(logical_pg: LogicalPostgres) -> AsyncIterator[AppDB]:
    """A fresh database on it: the app's table and spicesync's follow-mode tables."""
    server_url = logical_pg.url
    name = f"spicesync_cdc_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = with_database(server_url, name)
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
        admin = await asyncpg.connect(server_url)
        # A database with a logical slot cannot be dropped; a left slot would keep WAL.
        await admin.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = $1 AND NOT active",
            name,
        )
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def own_spicedb() -> AsyncIterator[SpiceDBServer]:
    """A SpiceDB engine of the test's own: a reconcile judges everything in it."""
    server = await launch_spicedb()
    yield server
    stop_spicedb(server)


@dataclass
class Cdc:
    """``spicesync relay cdc`` processes of one test, and what they work on."""

    temporal_address: str
    app_db: AppDB
    spicedb: SpiceDBServer
    spicedb_client: SpiceDBClient
    keys: str
    task_queue: str
    directory: Path
    slot: str
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    def env(self, **cdc: str) -> dict[str, str]:
        """A relay's whole configuration: the worker's, the mapping, ``SPICESYNC_CDC_*``."""
        settings = Settings(
            temporal_address=self.temporal_address,
            encryption_keys=SecretStr(self.keys),
            _env_file=None,
        )
        env = settings.worker_environment(
            task_queue=self.task_queue,
            database_url=self.app_db.url,
            spicedb_endpoint=self.spicedb.endpoint,
            spicedb_key=self.spicedb.preshared_key,
        )
        tuning = {
            "SLOT": self.slot,
            "PUBLICATION": self.slot,
            "POLL_SECONDS": "0.2",
            "RPC_TIMEOUT_SECONDS": "5",
            "METRICS_ADDRESS": "",
            "HEALTH_ADDRESS": "",
        } | {key.upper(): value for key, value in cdc.items()}
        env |= {f"SPICESYNC_CDC_{key}": value for key, value in tuning.items()}
        return env | {
            "SPICESYNC_CONFIG": str(self.directory / "spicesync.toml"),
            "SPICESYNC_TRACE_FILE": str(self.directory / "traces.jsonl"),
        }

    async def run(
        self, *args: str, log: str = "relay.log", **cdc: str
    ) -> asyncio.subprocess.Process:
        """Start ``python -m spicesync <args>`` with this configuration, logging to ``log``."""
        with open(self.directory / log, "ab") as out:  # noqa: ASYNC230 - opened once
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spicesync",
                *args,
                env=self.env(**cdc),
                stdout=out,
                stderr=out,
            )
        self.processes.append(process)
        return process

    async def start(self, **cdc: str) -> asyncio.subprocess.Process:
        """Start a relay."""
        return await self.run("relay", "cdc", **cdc)

    async def following(self, **cdc: str) -> asyncio.subprocess.Process:
        """Start a relay and wait until it follows the table (its slot exists from then on)."""
        started = self.log().count("cdc relay following")
        relay = await self.start(**cdc)

        async def follows() -> bool:
            return self.log().count("cdc relay following") > started

        await eventually(follows, timeout=90)
        return relay

    def log(self, name: str = "relay.log") -> str:
        path = self.directory / name
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    async def logged(self, text: str, name: str = "relay.log") -> bool:
        return text in self.log(name)

    async def in_step(self, user_ids: list[str]) -> bool:
        return await in_step(self.app_db, self.spicedb_client, user_ids)

    async def stop_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.fixture
async def cdc(
    temporal_env: WorkflowEnvironment,
    cdc_db: AppDB,
    own_spicedb: SpiceDBServer,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> AsyncIterator[Cdc]:
    """Relays of this test and a follow-mode worker, on the session's Temporal dev server."""
    address = temporal_env.client.service_client.config.target_host
    spicedb_client = own_spicedb.client()
    slot = f"cdc_{uuid.uuid4().hex[:12]}"
    cdc = Cdc(
        address, cdc_db, own_spicedb, spicedb_client, test_codec_keys, task_queue, tmp_path, slot
    )
    try:
        async with follow_worker(temporal_env.client, cdc_db, own_spicedb, task_queue, tmp_path):
            yield cdc
    finally:
        await cdc.stop_all()
        await spicedb_client.close()


def _ids(count: int) -> list[str]:
    return [f"acct-{uuid.uuid4().hex[:16]}" for _ in range(count)]


async def _reconciled(client: Client, workflow_id: str) -> bool:
    try:
        described = await client.get_workflow_handle(workflow_id).describe()
    except RPCError:
        return False
    return described.status == WorkflowExecutionStatus.COMPLETED


async def test_spicedb_follows_plain_sql_inserts_updates_and_deletes(
    cdc: Cdc, client: Client
) -> None:
    """``migrate --cdc`` creates the publication and slot; changes the app commits before any
    relay runs wait in the slot and are picked up when it starts; live inserts, updates
    (admin flag, team) and deletes follow; SIGTERM exits 0 with the slot confirmed past every
    change (nothing kept back for an idle table either, after the heartbeat)."""
    migrate = await cdc.run("migrate", "--cdc", log="migrate.log")
    assert await migrate.wait() == 0, cdc.log("migrate.log")
    assert f"created replication slot {cdc.slot}" in cdc.log("migrate.log")
    early = _ids(8)
    pool = cdc.app_db.pool
    for user_id in early:
        await pool.execute(_INSERT, user_id, "team-a", False)
    await pool.execute(_UPDATE, early[0], "team-b", True)
    await pool.execute(_DELETE, early[1])
    assert not await cdc.in_step(early)  # nothing reads the slot yet
    metrics = f"127.0.0.1:{free_port()}"
    # A threshold any lag passes: the warning is logged (once per crossing, not per look).
    relay = await cdc.start(METRICS_ADDRESS=metrics, LAG_WARN_BYTES="1")
    await eventually(lambda: cdc.in_step(early), timeout=_SYNCED_WITHIN)

    live = _ids(6)
    async with pool.acquire() as conn, conn.transaction():  # one transaction, several users
        for user_id in live:
            await conn.execute(_INSERT, user_id, "team-c", user_id == live[0])
    await pool.execute(_UPDATE, live[1], "team-d", True)
    await pool.execute(_UPDATE, early[2], "team-a", True)
    await pool.execute(_DELETE, live[2])
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_DELETE, early[3])
        # Before this transaction's commit: the slot is confirmed past it once it is done.
        last_change = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
    everyone = early + live
    await eventually(lambda: cdc.in_step(everyone), timeout=_SYNCED_WITHIN)
    assert await pool.fetchval("SELECT count(*) FROM accounts") == len(everyone) - 3

    async def confirmed_past_the_last_change() -> bool:
        confirmed = await pool.fetchval(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1", cdc.slot
        )
        return bool(confirmed > last_change)

    await eventually(confirmed_past_the_last_change, timeout=_SYNCED_WITHIN)
    page = await metrics_page(metrics)
    # One delivery per user per batch: at least one per changed user, never one per row.
    assert len(everyone) <= metric(page, "spicesync_cdc_changes_delivered")
    assert metric(page, "spicesync_cdc_row_changes") >= len(everyone) + 6
    assert "spicesync_cdc_lag_bytes" in page and "spicesync_cdc_lag_seconds" in page
    await eventually(lambda: cdc.logged("past SPICESYNC_CDC_LAG_WARN_BYTES"), timeout=30)
    relay.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(relay.wait(), 60) == 0, cdc.log()
    assert "cdc relay stopped" in cdc.log()


async def test_a_relay_killed_mid_stream_and_restarted_loses_nothing(cdc: Cdc) -> None:
    """The app commits a stream of inserts, updates and deletes while the relay, reading small
    batches, is SIGKILLed three times, each time once it has confirmed part of the stream, and
    started again: every user ends with exactly what its row implies."""
    users = _ids(60)
    pool = cdc.app_db.pool

    async def app() -> None:
        for index, user_id in enumerate(users):
            await pool.execute(_INSERT, user_id, f"team-{index % 3}", False)
            if index % 4 == 1:
                await pool.execute(_UPDATE, users[index - 1], "team-z", True)
            if index % 7 == 3:
                await pool.execute(_DELETE, users[index - 2])
            await asyncio.sleep(0.05)

    async def confirmed() -> int:
        return int(
            await pool.fetchval(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                cdc.slot,
            )
            or 0
        )

    relay = await cdc.following(BATCH_SIZE="10")
    writer = asyncio.create_task(app())
    for _ in range(3):
        before = await confirmed()

        async def moved(since: int = before) -> bool:
            return await confirmed() > since

        await eventually(moved, timeout=_SYNCED_WITHIN / 2)
        relay.kill()
        await relay.wait()
        relay = await cdc.start(BATCH_SIZE="10")
    await writer
    await eventually(lambda: cdc.in_step(users), timeout=_SYNCED_WITHIN)


async def test_postgresql_restarted_under_the_relay(cdc: Cdc, logical_pg: LogicalPostgres) -> None:
    """PostgreSQL stops and starts again while the relay runs: it waits (one log line each way)
    and then delivers what was committed after the restart."""
    before, after = _ids(3), _ids(3)
    pool = cdc.app_db.pool
    await cdc.following()
    for user_id in before:
        await pool.execute(_INSERT, user_id, "team-a", False)
    await eventually(lambda: cdc.in_step(before), timeout=_SYNCED_WITHIN)
    await asyncio.to_thread(logical_pg.stop)
    # Down until the relay has seen it: a restart quicker than the relay's poll goes unnoticed
    # (its pool reconnects), and there would be nothing to wait out.
    await eventually(lambda: cdc.logged("PostgreSQL is unavailable"), timeout=60)
    await asyncio.to_thread(logical_pg.start)
    pool.terminate()  # its connections died with the server
    cdc.app_db.pool = await asyncpg.create_pool(cdc.app_db.url, min_size=1, max_size=4)
    for user_id in after:
        await cdc.app_db.pool.execute(_INSERT, user_id, "team-b", True)
    await eventually(lambda: cdc.in_step(before + after), timeout=_SYNCED_WITHIN)
    await eventually(lambda: cdc.logged("PostgreSQL is available again"), timeout=60)


async def pool_close_quietly(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), 5)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pool.terminate()


async def test_a_lost_slot_is_recreated_and_a_reconcile_repairs_what_it_missed(
    cdc: Cdc, client: Client
) -> None:
    """The slot is dropped while no relay runs, and the app changes rows meanwhile: the next
    relay says the slot was lost, creates it again, starts a reconcile through Temporal (one
    id per loss), and SpiceDB ends right for the rows changed while nobody read the WAL."""
    users = _ids(4)
    pool = cdc.app_db.pool
    relay = await cdc.following()
    for user_id in users:
        await pool.execute(_INSERT, user_id, "team-a", False)
    await eventually(lambda: cdc.in_step(users), timeout=_SYNCED_WITHIN)
    relay.kill()
    await relay.wait()
    await pool.execute("SELECT pg_drop_replication_slot($1)", cdc.slot)
    await pool.execute(_UPDATE, users[0], "team-b", True)
    await pool.execute(_DELETE, users[1])
    assert not await cdc.in_step(users)  # nobody delivered these
    await cdc.start()
    await eventually(lambda: cdc.logged(f"replication slot {cdc.slot} was lost"), timeout=60)
    reconcile = f"{CDC_RECONCILE_WORKFLOW_PREFIX}-{cdc.slot}-lost-1"
    await eventually(lambda: _reconciled(client, reconcile), timeout=_SYNCED_WITHIN)
    await eventually(lambda: cdc.in_step(users), timeout=_SYNCED_WITHIN)
    # Followed again from the new slot.
    await pool.execute(_UPDATE, users[2], "team-c", True)
    await eventually(lambda: cdc.in_step(users), timeout=_SYNCED_WITHIN)


async def test_a_truncated_table_starts_a_reconcile(cdc: Cdc, client: Client) -> None:
    """TRUNCATE sends no row deletes: the relay starts a reconcile, which removes what the
    gone rows implied; the slot moves past the truncate only once Temporal accepted it."""
    users = _ids(4)
    pool = cdc.app_db.pool
    await cdc.following()
    for user_id in users:
        await pool.execute(_INSERT, user_id, "team-a", False)
    await eventually(lambda: cdc.in_step(users), timeout=_SYNCED_WITHIN)
    await pool.execute("TRUNCATE accounts")
    await eventually(lambda: cdc.logged("the mapped table was truncated"), timeout=60)
    await eventually(lambda: cdc.in_step(users), timeout=_SYNCED_WITHIN)
    started = re.findall(rf"reconcile ({CDC_RECONCILE_WORKFLOW_PREFIX}-\S+) started", cdc.log())
    assert len(set(started)) == 1 and "-truncate-" in started[0]
    await eventually(lambda: _reconciled(client, started[0]), timeout=_SYNCED_WITHIN)


async def test_a_table_whose_deletes_do_not_name_the_user_is_refused(cdc: Cdc) -> None:
    """No primary key (REPLICA IDENTITY DEFAULT carries no id): the relay exits 2 with one line
    naming ALTER TABLE ... REPLICA IDENTITY FULL, and changes nothing of the table."""
    await cdc.app_db.pool.execute("ALTER TABLE accounts DROP CONSTRAINT accounts_pkey")
    relay = await cdc.start()
    assert await asyncio.wait_for(relay.wait(), 60) == 2
    assert "ALTER TABLE accounts REPLICA IDENTITY FULL" in cdc.log()
    identity = await cdc.app_db.pool.fetchval(
        "SELECT relreplident::text FROM pg_class WHERE oid = 'accounts'::regclass"
    )
    assert identity == "d"


async def test_without_logical_wal_the_relay_names_the_setting(
    cdc: Cdc, logical_pg: LogicalPostgres
) -> None:
    """A server with wal_level = replica: the relay exits 2 with one line naming the setting."""
    admin = await asyncpg.connect(logical_pg.url)
    try:
        await admin.execute("ALTER SYSTEM SET wal_level = replica")
    finally:
        await admin.close()
    await pool_close_quietly(cdc.app_db.pool)
    try:
        await asyncio.to_thread(logical_pg.restart)
        cdc.app_db.pool = await asyncpg.create_pool(cdc.app_db.url, min_size=1, max_size=2)
        relay = await cdc.start()
        assert await asyncio.wait_for(relay.wait(), 60) == 2
        lines = [line for line in cdc.log().splitlines() if "wal_level" in line]
        assert len(lines) == 1 and "wal_level = logical" in lines[0], cdc.log()
    finally:
        admin = await asyncpg.connect(logical_pg.url)
        await admin.execute("ALTER SYSTEM RESET wal_level")
        await admin.close()
        await asyncio.to_thread(logical_pg.restart)
