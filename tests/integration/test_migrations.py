"""The App DB migrations: versioned, applied once, safe to run concurrently."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from spicesync.db import apply_migrations, load_migrations

pytestmark = pytest.mark.integration


async def test_migrations_apply_once_even_when_run_concurrently(
    database_url: str, app_db: asyncpg.Pool
) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(apply_migrations(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    assert applied == [[], [], []]  # the session fixture already migrated
    versions = [
        r["version"]
        for r in await app_db.fetch("SELECT version FROM spicesync_schema_migrations ORDER BY 1")
    ]
    assert versions == [m.version for m in load_migrations()]


async def test_email_is_unique_case_insensitively(app_db: asyncpg.Pool) -> None:
    insert = (
        "INSERT INTO users (id, email, name, org_id, role, created_by_run)"
        " VALUES ($1, $2, 'n', 'o', 'member', 'r')"
    )
    first, second, local = uuid.uuid4(), uuid.uuid4(), uuid.uuid4().hex
    try:
        await app_db.execute(insert, first, f"Case-{local}@Example.com")
        with pytest.raises(asyncpg.UniqueViolationError):
            await app_db.execute(insert, second, f"case-{local}@example.COM")
    finally:
        await app_db.execute("DELETE FROM users WHERE id = ANY($1::uuid[])", [first, second])
