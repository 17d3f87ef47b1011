"""PostgreSQL access: the connection pool and the versioned migrations."""

from __future__ import annotations

import hashlib
import importlib.resources
import re
import urllib.parse
from dataclasses import dataclass, field

import asyncpg

__all__ = [
    "OWNED_MODE_ONLY",
    "ChangedMigration",
    "DatabaseAhead",
    "Migration",
    "MigrationRefused",
    "MigrationRun",
    "apply_migrations",
    "create_pool",
    "load_migrations",
    "migrate",
    "with_database",
]

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any fixed number works; it only has to be the same for every process that migrates.
_MIGRATION_LOCK_KEY = 0x5F1CE5
# Migrations that create or change spicesync's own ``users`` table: owned mode only. In follow
# mode the application owns its users table (perhaps named ``users``), so only the
# ``spicesync_*`` migrations run there.
OWNED_MODE_ONLY: frozenset[int] = frozenset({1, 2, 3, 4})
_LEDGER_TABLE = "spicesync_schema_migrations"
_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {_LEDGER_TABLE} (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
# Ledgers written before checksums were kept lack the column; their rows get theirs on the
# next run (``migrate``), computed from the shipped file.
_LEDGER_CHECKSUM = f"ALTER TABLE {_LEDGER_TABLE} ADD COLUMN IF NOT EXISTS checksum text"


@dataclass(frozen=True)
class Migration:
    """One versioned migration file."""

    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        """``0003_reconciliation``: the file's name without ``.sql``."""
        return f"{self.version:04d}_{self.name}"

    @property
    def checksum(self) -> str:
        """SHA-256 of the SQL, line endings normalised (a checkout's CRLF is no change)."""
        return hashlib.sha256(self.sql.replace("\r\n", "\n").encode("utf-8")).hexdigest()


class MigrationRefused(RuntimeError):
    """The database's migration ledger does not match this code: nothing was applied."""


class ChangedMigration(MigrationRefused):
    """A migration already applied differs from the shipped file (checksum or name)."""


class DatabaseAhead(MigrationRefused):
    """The ledger holds versions this code does not ship: a newer spicesync migrated it."""


@dataclass
class MigrationRun:
    """What :func:`migrate` did, or (dry run) would do."""

    pending: list[Migration]
    """Migrations not applied before this run, in order (applied now unless a dry run)."""
    checksums_recorded: list[int] = field(default_factory=list)
    """Versions applied before checksums were kept, whose checksum this run recorded (or,
    dry run, would record)."""
    applied_before: int = 0
    """Migrations the ledger held before this run."""
    dry_run: bool = False


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


async def _ledger(conn: asyncpg.Connection) -> dict[int, tuple[str, str | None]]:
    """The ledger's rows (version → name, checksum); empty if there is no ledger yet.

    Read-only, so a dry run can call it: a ledger from before checksums reads as ``None``.
    """
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", _LEDGER_TABLE)
    if not exists:
        return {}
    has_checksum = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
        " WHERE table_name = $1 AND column_name = 'checksum'"
        " AND table_schema = ANY(current_schemas(false)))",
        _LEDGER_TABLE,
    )
    checksum = "checksum" if has_checksum else "NULL::text"
    rows = await conn.fetch(f"SELECT version, name, {checksum} AS checksum FROM {_LEDGER_TABLE}")
    return {r["version"]: (r["name"], r["checksum"]) for r in rows}


def _plan(ledger: dict[int, tuple[str, str | None]], *, owned: bool, dry_run: bool) -> MigrationRun:
    """Compare the ledger with the shipped migrations.

    Raises:
        DatabaseAhead: The ledger has versions this code does not ship.
        ChangedMigration: An applied migration's name or checksum differs from the file's.
    """
    # Every shipped migration, whatever the mode: a follow-mode database that was once owned
    # holds owned-only versions, and those are known, not "ahead".
    shipped = {m.version: m for m in load_migrations(owned=True)}
    unknown = sorted(set(ledger) - set(shipped))
    if unknown:
        names = ", ".join(f"{v:04d}_{ledger[v][0]}" for v in unknown)
        raise DatabaseAhead(
            f"the database has migrations this spicesync does not ship ({names}): a newer"
            " spicesync migrated it; run that version, never an older one, against it"
        )
    backfill: list[int] = []
    for version, (name, checksum) in sorted(ledger.items()):
        migration = shipped[version]
        if name != migration.name:
            raise ChangedMigration(
                f"migration {version:04d} is {migration.label} in this spicesync but"
                f" {version:04d}_{name} in the database's ledger ({_LEDGER_TABLE}): it was"
                " renamed or replaced after it was applied; restore the shipped file"
            )
        if checksum is not None and checksum != migration.checksum:
            raise ChangedMigration(
                f"migration {migration.label} was changed after it was applied (its checksum"
                f" differs from the one {_LEDGER_TABLE} recorded): restore the shipped file and"
                " put the change into a new migration"
            )
        if checksum is None:
            backfill.append(version)
    pending = [m for m in load_migrations(owned=owned) if m.version not in ledger]
    return MigrationRun(pending, backfill, len(ledger), dry_run)


async def migrate(
    conn: asyncpg.Connection, *, owned: bool = True, dry_run: bool = False
) -> MigrationRun:
    """Check the ledger against the shipped migrations, then apply what is missing.

    Safe to run concurrently from several processes: an advisory lock serialises them, and the
    ledger table makes a second run a no-op. Each migration runs in its own transaction with
    its ledger row (version, name, SHA-256 of its SQL).

    Args:
        conn: A connection to the App DB.
        owned: Owned mode; ``False`` applies only follow mode's (see :func:`load_migrations`).
        dry_run: Only say what would be applied; change nothing (no lock, no ledger).

    Returns:
        What was (or would be) applied, and whose checksums were recorded.

    Raises:
        DatabaseAhead: The ledger has versions this code does not ship; nothing applied.
        ChangedMigration: An applied migration differs from the shipped file; nothing applied.
    """
    if dry_run:
        return _plan(await _ledger(conn), owned=owned, dry_run=True)
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_LEDGER)
        await conn.execute(_LEDGER_CHECKSUM)
        run = _plan(await _ledger(conn), owned=owned, dry_run=False)
        shipped = {m.version: m for m in load_migrations(owned=True)}
        for version in run.checksums_recorded:
            await conn.execute(
                f"UPDATE {_LEDGER_TABLE} SET checksum = $2 WHERE version = $1 AND checksum IS NULL",
                version,
                shipped[version].checksum,
            )
        for migration in run.pending:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {_LEDGER_TABLE} (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    return run


async def apply_migrations(conn: asyncpg.Connection, *, owned: bool = True) -> list[int]:
    """Apply every migration not yet applied (see :func:`migrate`).

    Args:
        conn: A connection to the App DB.
        owned: Owned mode; ``False`` applies only follow mode's (see :func:`load_migrations`).

    Returns:
        The versions applied by this call.
    """
    run = await migrate(conn, owned=owned)
    return [m.version for m in run.pending]


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
