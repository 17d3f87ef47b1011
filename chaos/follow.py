"""Follow mode under fire: an application writes its own table and the outbox; the relay dies.

The application here is what docs/follow-mode.md describes: a users table of its own shape
(:data:`APP_TABLE`), written with plain SQL, and one ``spicesync_outbox`` insert in each of its
transactions. ``spicesync relay outbox`` delivers the changes and follow-mode ``spicesync worker``
processes (mapping :data:`MAPPING`) bring SpiceDB in step. The relay is SIGKILLed at the instants
SpiceDB acknowledges the ¼, ½ and ¾ marks of the expected writes (so mid-batch: the changes it
had delivered are synced while its delete has not happened), and restarted a second later, while
the application keeps writing. The verdict (:func:`chaos.verdict.judge_follow`) compares SpiceDB,
read independently, with what each row implies now.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

import asyncpg
from authzed.api.v1 import RelationshipUpdate
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from chaos.faults import on_spicedb_writes
from chaos.scene import Scene
from chaos.verdict import follow_in_step, held_by_user, judge_follow
from spicesync.constants import USER_CHANGED_SIGNAL, followed_user_workflow_id
from spicesync.models import UserChangedInput
from workers.outbox_relay import LISTEN_APPLICATION_NAME

__all__ = [
    "APP_TABLE",
    "MAPPING",
    "AppChange",
    "app_changes",
    "implied",
    "real_changes_per_user",
    "relay_killed",
]

# The application's own table; spicesync reads the mapped columns and never writes it.
APP_TABLE: Final = """
CREATE SCHEMA IF NOT EXISTS chaos_app;
CREATE TABLE IF NOT EXISTS chaos_app.accounts (
    account_id   text    PRIMARY KEY,
    display_name text    NOT NULL,
    team_id      text    NOT NULL,
    is_admin     boolean NOT NULL DEFAULT false,
    row_version  bigint  NOT NULL DEFAULT 1
)
"""
MAPPING: Final = """
[source]
table = "chaos_app.accounts"
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
# The application's transactions: its own statement, then the outbox insert, committed together.
_INSERT: Final = """
INSERT INTO chaos_app.accounts (account_id, display_name, team_id, is_admin)
VALUES ($1, $2, $3, $4) RETURNING row_version
"""
_UPDATE: Final = """
UPDATE chaos_app.accounts
SET display_name = $2, team_id = $3, is_admin = $4, row_version = row_version + 1
WHERE account_id = $1 RETURNING row_version
"""
_DELETE: Final = "DELETE FROM chaos_app.accounts WHERE account_id = $1"
_OUTBOX_INSERT: Final = "INSERT INTO spicesync_outbox (user_id, version) VALUES ($1, $2)"
_LISTENING: Final = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1 AND backend_start >= $2
"""

# The application's pace (transactions per second, open loop): at most about what the relay
# delivers to new workflows on a quiet 2-core box, and slow enough for a small run's stream to
# last through three kills and restarts.
APP_RATE: Final = 40.0
_MIN_STREAM_SECONDS: Final = 20.0
# Changes to a user come this many insertions after its own.
_LAG: Final = 10
_RESTART_AFTER_SECONDS: Final = 1.0
# From a mark, the relay is killed at the first write the probe finds mid-batch, or this many
# writes later.
_AIM_WRITES: Final = 20
_CONVERGE_SECONDS: Final = 600.0

State = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class AppChange:
    """One application transaction on one user's row (``deleted``: the row is removed)."""

    user_id: str
    display_name: str
    team_id: str
    is_admin: bool
    kind: str  # insert | update | delete

    def implies(self) -> State:
        """The relationships the mapping implies once this change committed."""
        if self.kind == "delete":
            return frozenset()
        return frozenset({(self.team_id, "admin" if self.is_admin else "member")})


def app_changes(count: int, *, org: str) -> Iterator[AppChange]:
    """``count`` users' insertions, each followed (``_LAG`` insertions later) by its changes.

    A third of the users toggle admin, a seventh move to another team, a fifth get an update of
    an unmapped column only (a change that needs no SpiceDB write), an eleventh are deleted.
    """
    rows: dict[int, AppChange] = {}

    def later(j: int) -> Iterator[AppChange]:
        row = rows[j]
        if j % 3 == 0:
            row = replace(row, is_admin=not row.is_admin, kind="update")
            yield row
        if j % 5 == 2:
            row = replace(row, display_name=f"{row.display_name} (renamed)", kind="update")
            yield row
        if j % 7 == 1:
            row = replace(row, team_id=f"{org}-{(j + 1) % 3}", kind="update")
            yield row
        if j % 11 == 4:
            yield replace(row, kind="delete")

    for i in range(count):
        rows[i] = AppChange(
            user_id=f"acct-{uuid.uuid4().hex[:16]}",
            display_name=f"Chaos account {i}",
            team_id=f"{org}-{i % 3}",
            is_admin=i % 5 == 0,
            kind="insert",
        )
        yield rows[i]
        if i >= _LAG:
            yield from later(i - _LAG)
    for j in range(max(0, count - _LAG), count):
        yield from later(j)


async def _commit(
    conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], change: AppChange
) -> None:
    """The application's transaction for ``change``: its statement and the outbox row."""
    async with conn.transaction():
        if change.kind == "delete":
            await conn.execute(_DELETE, change.user_id)
            # No row, no version: the change must be synced whatever was synced before.
            version = None
        else:
            statement = _INSERT if change.kind == "insert" else _UPDATE
            version = await conn.fetchval(
                statement, change.user_id, change.display_name, change.team_id, change.is_admin
            )
        await conn.execute(_OUTBOX_INSERT, change.user_id, version)


async def implied(pool: asyncpg.Pool, user_ids: list[str]) -> dict[str, State]:
    """What each user's row implies now, read from the application's table with plain SQL."""
    rows = await pool.fetch("SELECT account_id, team_id, is_admin FROM chaos_app.accounts")
    now = {
        r["account_id"]: frozenset({(r["team_id"], "admin" if r["is_admin"] else "member")})
        for r in rows
    }
    return {u: now.get(u, frozenset()) for u in user_ids}


async def _redeliveries(client: Client, user_ids: list[str]) -> tuple[int, int]:
    """``user_changed`` signals the users' workflows hold, and how many repeat an earlier one.

    A repeat carries the outbox position of a change already delivered: the relay delivered
    those rows again after a kill (Temporal had accepted them; the delete had not happened).
    """
    gate = asyncio.Semaphore(16)
    total = repeated = 0

    async def one(user_id: str) -> None:
        nonlocal total, repeated
        async with gate:
            handle = client.get_workflow_handle(followed_user_workflow_id(user_id))
            try:
                history = await handle.fetch_history()
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    return
                raise
            seen: set[str | None] = set()
            for event in history.events:
                if not event.HasField("workflow_execution_signaled_event_attributes"):
                    continue
                attributes = event.workflow_execution_signaled_event_attributes
                if attributes.signal_name != USER_CHANGED_SIGNAL:
                    continue
                [change] = await client.data_converter.decode(
                    attributes.input.payloads, [UserChangedInput]
                )
                total += 1
                repeated += change.position in seen
                seen.add(change.position)

    await asyncio.gather(*(one(u) for u in user_ids))
    return total, repeated


async def relay_killed(scene: Scene) -> None:
    """App writes through the outbox; the relay SIGKILLed three times mid-stream, restarted."""
    await scene.pool.execute(APP_TABLE)
    mapping = scene.run.directory / f"spicesync-{scene.task_queue}.toml"
    mapping.write_text(MAPPING)
    scene.workers.extra_env = {"SPICESYNC_CONFIG": str(mapping)}
    relays = replace(
        scene.workers,
        processes=[],
        command=("relay", "outbox"),
        log=scene.run.directory / "relay-relay_killed.log",
        extra_env={"SPICESYNC_OUTBOX_METRICS_ADDRESS": "", "SPICESYNC_OUTBOX_POLL_SECONDS": "1"},
    )
    changes = list(app_changes(scene.run.users, org=scene.org_id))
    users = list(dict.fromkeys(c.user_id for c in changes))
    real_changes = real_changes_per_user(changes)
    rate = min(APP_RATE, len(changes) / _MIN_STREAM_SECONDS)
    marks = {len(users) // 4, len(users) // 2, 3 * len(users) // 4}
    writes, kills, mid_batch, armed, armed_at = 0, 0, 0, 0, 0
    restarted: list[float] = []
    lock = asyncio.Lock()
    running = asyncio.Event()  # a relay is in its delivery loop
    restarting: set[asyncio.Task[None]] = set()

    async def start_relay(pause: float) -> None:
        await asyncio.sleep(pause)  # the application writes on meanwhile
        since = datetime.now(UTC)
        await relays.start()
        await _until_listening(scene.pool, since)
        restarted.append(time.monotonic())
        running.set()

    async def acknowledged(updates: list[RelationshipUpdate]) -> None:
        nonlocal writes, kills, mid_batch, armed, armed_at
        async with lock:
            writes += 1
            if writes in marks:
                armed, armed_at = armed + 1, writes
            if not armed or not running.is_set():
                return  # a mark passed while the relay was down aims at the restarted one
            # Aim for the window that matters: this user's change delivered and synced while
            # the relay still holds (has not deleted) its outbox rows, i.e. mid-batch.
            written = sorted({u.relationship.subject.object.object_id for u in updates})
            held = await _claimed(scene.pool, written)
            if held or writes - armed_at >= _AIM_WRITES:
                armed, armed_at = armed - 1, writes
                mid_batch += held
                running.clear()
                kills += await relays.crash_all()
                task = asyncio.create_task(start_relay(_RESTART_AFTER_SECONDS))
                restarting.add(task)
                task.add_done_callback(restarting.discard)

    await scene.workers.start()
    await scene.wait_for_workers()
    await start_relay(0)
    try:
        async with on_spicedb_writes(scene.spicedb, acknowledged):
            await _write(scene.pool, changes, rate)
            converged = await _converge(scene, users, restarting)
        if restarting:
            await asyncio.gather(*restarting)
        if restarted and converged is not None:
            scene.result.recovery_seconds = round(converged - restarted[-1], 1)
        outbox_rows = int(await scene.pool.fetchval("SELECT count(*) FROM spicesync_outbox"))
        failed = int(
            await scene.pool.fetchval(
                "SELECT count(*) FROM spicesync_followed_users WHERE status = 'failed'"
            )
        )
        if failed:
            scene.result.problems.append(f"{failed} users recorded as failed syncs")
        await judge_follow(
            scene.result,
            spicedb=scene.spicedb,
            client=scene.client,
            task_queue=scene.task_queue,
            implied=await implied(scene.pool, users),
            real_changes=real_changes,
            outbox_rows=outbox_rows,
        )
    finally:
        await relays.crash_all()
    if kills < 3:
        scene.result.problems.append(f"the relay was killed {kills} times, not 3")
        scene.result.passed = False
    signals, repeated = await _redeliveries(scene.client, users)
    deleted = sum(1 for c in changes if c.kind == "delete")
    scene.result.notes.append(
        f"{len(changes)} application transactions ({len(users)} inserts, {deleted} deletes) at"
        f" {rate:.0f}/s; relay SIGKILLed {kills} times from SpiceDB writes"
        f" {', '.join(map(str, sorted(marks)))} on, {mid_batch} of them while it held the synced"
        f" user's outbox rows undeleted; restarted {_RESTART_AFTER_SECONDS:g} s later"
    )
    scene.result.notes.append(
        f"{signals} changes delivered to the users' workflows, {repeated} of them again after a"
        " kill (the same outbox position delivered twice)"
    )


def real_changes_per_user(changes: list[AppChange]) -> dict[str, int]:
    """Per user, how many of its committed transactions changed what its row implies."""
    state: dict[str, State] = {}
    count: dict[str, int] = {}
    for change in changes:
        before = state.get(change.user_id, frozenset())
        after = change.implies()
        count[change.user_id] = count.get(change.user_id, 0) + (after != before)
        state[change.user_id] = after
    return count


async def _write(pool: asyncpg.Pool, changes: list[AppChange], rate: float) -> None:
    """Commit the changes in order on one connection, open loop at ``rate`` per second."""
    began = time.monotonic()
    async with pool.acquire() as conn:
        for i, change in enumerate(changes):
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await _commit(conn, change)


async def _claimed(pool: asyncpg.Pool, user_ids: list[str]) -> bool:
    """Whether these users have outbox rows and a relay holds every one (claimed, undeleted)."""
    rows = await pool.fetchval(
        "SELECT count(*) FROM spicesync_outbox WHERE user_id = ANY($1)", user_ids
    )
    # Rows a relay holds FOR UPDATE are skipped; the probe's own lock lasts one statement.
    free = await pool.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM spicesync_outbox WHERE user_id = ANY($1)"
        " FOR KEY SHARE SKIP LOCKED) f",
        user_ids,
    )
    return bool(rows) and not free


async def _until_listening(pool: asyncpg.Pool, since: datetime) -> None:
    """Until a relay started after ``since`` LISTENs: it is in its delivery loop."""
    deadline = time.monotonic() + 120
    while not await pool.fetchval(_LISTENING, LISTEN_APPLICATION_NAME, since):
        if time.monotonic() > deadline:
            raise RuntimeError("the outbox relay did not start within 120 s")
        await asyncio.sleep(0.1)


async def _converge(
    scene: Scene, users: list[str], restarting: set[asyncio.Task[None]]
) -> float | None:
    """Wait until the outbox is empty and SpiceDB holds what every row implies; when, or None."""
    deadline = time.monotonic() + _CONVERGE_SECONDS
    while time.monotonic() < deadline:
        if (
            not restarting
            and not await scene.pool.fetchval("SELECT count(*) FROM spicesync_outbox")
            and follow_in_step(await implied(scene.pool, users), await held_by_user(scene.spicedb))
        ):
            return time.monotonic()
        await asyncio.sleep(1)
    return None
