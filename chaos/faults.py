"""Ways to hit the real stores at an exact moment, without any hook in spicesync's code.

* :data:`FAULTS_DDL` makes PostgreSQL fail one statement kind for chosen users with a chosen
  SQLSTATE (a trigger on ``users``); the integration tests use it too.
* :func:`on_commits` calls back when a change to ``users`` *commits* (``pg_notify`` is delivered
  at commit), which is "right after the PostgreSQL commit, before the activity reports".
* :func:`on_spicedb_writes` calls back when SpiceDB has acknowledged a write (its Watch stream).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import asyncpg
from authzed.api.v1 import RelationshipUpdate, WatchRequest

from spicesync.spicedb import MANAGED_RELATIONS, SpiceDBClient

__all__ = ["FAULTS_DDL", "inject_fault", "on_commits", "on_spicedb_writes"]

FAULTS_DDL = """
CREATE TABLE IF NOT EXISTS injected_faults (
    user_id  uuid NOT NULL,
    op       text NOT NULL,
    sqlstate text NOT NULL
);
CREATE OR REPLACE FUNCTION inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    state text;
BEGIN
    SELECT f.sqlstate INTO state FROM injected_faults f
    WHERE f.user_id = (CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END) AND f.op = TG_OP;
    -- 'UPDATE' faults target recording an event on the row (apply_row, or the ZedToken a
    -- SpiceDB write stores on it), not the claim a SpiceDB write takes on the row (which
    -- changes only permissions_written_at).
    IF TG_OP = 'UPDATE' AND NEW.version = OLD.version
       AND NEW.zed_token IS NOT DISTINCT FROM OLD.zed_token THEN
        state := NULL;
    END IF;
    IF state IS NOT NULL THEN
        RAISE EXCEPTION 'injected fault' USING ERRCODE = state;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;
DROP TRIGGER IF EXISTS inject_fault ON users;
CREATE TRIGGER inject_fault BEFORE INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION inject_fault();
"""

_NOTIFY_DDL = """
CREATE OR REPLACE FUNCTION notify_users_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('users_change', TG_OP);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS notify_users_change ON users;
CREATE TRIGGER notify_users_change AFTER INSERT OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION notify_users_change();
"""


async def inject_fault(pool: asyncpg.Pool, user_ids: list[str], op: str, sqlstate: str) -> None:
    """Make ``op`` (INSERT, UPDATE, DELETE) on these users fail with ``sqlstate``."""
    await pool.execute(FAULTS_DDL)
    await pool.executemany(
        "INSERT INTO injected_faults VALUES ($1::uuid, $2, $3)",
        [(u, op, sqlstate) for u in user_ids],
    )


@contextlib.asynccontextmanager
async def on_commits(
    database_url: str, callback: Callable[[str], Coroutine[Any, Any, None]]
) -> AsyncIterator[None]:
    """Call ``callback("INSERT" | "DELETE")`` as each change to ``users`` commits."""
    conn = await asyncpg.connect(database_url)
    await conn.execute(_NOTIFY_DDL)
    pending: set[asyncio.Task[None]] = set()

    def heard(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        task = asyncio.get_running_loop().create_task(callback(str(payload)))
        pending.add(task)
        task.add_done_callback(pending.discard)

    await conn.add_listener("users_change", heard)
    try:
        yield
    finally:
        await conn.remove_listener("users_change", heard)
        await conn.execute("DROP TRIGGER IF EXISTS notify_users_change ON users")
        await conn.close()
        for task in list(pending):
            await task


@contextlib.asynccontextmanager
async def on_spicedb_writes(
    spicedb: SpiceDBClient,
    callback: Callable[[list[RelationshipUpdate]], Coroutine[Any, Any, None]],
) -> AsyncIterator[None]:
    """Call ``callback(updates)`` for every acknowledged write to spicesync's memberships."""

    async def watch() -> None:
        async for response in spicedb.Watch(WatchRequest(optional_object_types=["organization"])):
            updates = [u for u in response.updates if u.relationship.relation in MANAGED_RELATIONS]
            if updates:
                await callback(updates)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)  # the stream is open before the first write we care about
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
