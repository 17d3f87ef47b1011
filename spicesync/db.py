"""PostgreSQL access: the connection pool and the versioned migrations."""

from __future__ import annotations

import importlib.resources
import re
import urllib.parse
from dataclasses import dataclass

import asyncpg

__all__ = [
    "OWNED_MODE_ONLY",
    "Migration",
    "apply_migrations",
    "create_pool",
    "load_migrations",
    "with_database",
]

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any fixed number works; it only has to be the same for every process that migrates.
_MIGRATION_LOCK_KEY = 0x5F1CE5
# Migrations that create or change spicesync's own ``users`` table: owned mode only. In follow
# mode the application owns its users table (perhaps named ``users``), so only the
# ``spicesync_*`` migrations run there.
OWNED_MODE_ONLY: frozenset[int] = frozenset({1, 2, 3, 4})
_LEDGER = """
CREATE TABLE IF NOT EXISTS spicesync_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One versioned migration file."""

    version: int
    name: str
    sql: str


def load_migrations(*, owned: bool = True) -> list[Migration]:
    """Read the packaged migrations, ordered by version.

    Args:
        owned: Owned mode (spicesync's own ``users`` table); ``False`` for follow mode, which
            gets only the migrations of spicesync's ``spicesync_*`` tables.

    Returns:
        The migrations of that mode shipped with spicesync.
    """
    found: list[Migration] = []
    for entry in importlib.resources.files("spicesync.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            version = int(match[1])
            if owned or version not in OWNED_MODE_ONLY:
                found.append(Migration(version, match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


async def apply_migrations(conn: asyncpg.Connection, *, owned: bool = True) -> list[int]:
    """Apply every migration not yet applied, each in its own transaction.

    Safe to run concurrently from several processes: an advisory lock serialises them, and the
    ledger table makes a second run a no-op.

    Args:
        conn: A connection to the App DB.
        owned: Owned mode; ``False`` applies only follow mode's (see :func:`load_migrations`).

    Returns:
        The versions applied by this call.
    """
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_LEDGER)
        done = {
            r["version"]
            for r in await conn.fetch("SELECT version FROM spicesync_schema_migrations")
        }
        for migration in load_migrations(owned=owned):
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO spicesync_schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    return applied_now


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """Create the worker's one connection pool.

    Args:
        dsn: The App DB's connection URL.
        min_size: Connections opened at once.
        max_size: Upper bound of open connections.

    Returns:
        An open pool.
    """
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        # A statement that hangs (a lock, a sick server) must fail the attempt well inside the
        # activity's start-to-close timeout so the retry policy, not a stuck task, takes over.
        command_timeout=10,
        timeout=5,
    )
    assert pool is not None
    return pool


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` on the same server (for scratch databases).

    Args:
        url: A PostgreSQL connection URL.
        name: Another database's name.

    Returns:
        The URL with its path replaced.
    """
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
