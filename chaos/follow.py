"""Follow mode under fire: an application writes its own table and the outbox; the relay dies.

The application here is what docs/follow-mode.md describes: a users table of its own shape
(:data:`APP_TABLE`), written with plain SQL, and one ``spicesync_outbox`` insert in each of its
transactions. ``spicesync relay outbox`` delivers the changes and follow-mode ``spicesync worker``
processes (mapping :data:`MAPPING`) bring SpiceDB in step. The relay is SIGKILLed four times
while the application keeps writing (see :class:`_RelayKiller`): as the ¼ and ½ marks of the
application's transactions commit, and each restarted relay again during its first batch,
aimed at the window between Temporal's accept and the outbox delete.
The verdict (:func:`chaos.verdict.judge_follow`) compares SpiceDB, read independently, with what
each row implies now.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from chaos.engines import WorkerProcesses
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
    "app_statement",
    "implied",
    "real_changes_per_user",
    "redeliveries",
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
# last through four kills and restarts.
APP_RATE: Final = 40.0
_MIN_STREAM_SECONDS: Final = 20.0
# Changes to a user come this many insertions after its own.
_LAG: Final = 10
_RESTART_AFTER_SECONDS: Final = 1.0
# A restarted relay is killed at the first write the probe finds mid-batch, or this many writes
# or seconds after it started.
_AIM_WRITES: Final = 20
_AIM_SECONDS: Final = 3.0
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


async def app_statement(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
    change: AppChange,
) -> int | None:
    """The application's own statement for ``change``; the row's version after it.

    ``None`` for a delete: no row, no version, so the change is synced whatever was before.
    """
    if change.kind == "delete":
        await conn.execute(_DELETE, change.user_id)
        return None
    statement = _INSERT if change.kind == "insert" else _UPDATE
    version = await conn.fetchval(
        statement, change.user_id, change.display_name, change.team_id, change.is_admin
    )
    return int(version)


async def _commit(
    conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], change: AppChange
) -> None:
    """The application's transaction for ``change``: its statement and the outbox row."""
    async with conn.transaction():
        version = await app_statement(conn, change)
        await conn.execute(_OUTBOX_INSERT, change.user_id, version)


async def implied(pool: asyncpg.Pool, user_ids: list[str]) -> dict[str, State]:
    """What each user's row implies now, read from the application's table with plain SQL."""
    rows = await pool.fetch("SELECT account_id, team_id, is_admin FROM chaos_app.accounts")
    now = {
        r["account_id"]: frozenset({(r["team_id"], "admin" if r["is_admin"] else "member")})
        for r in rows
    }
    return {u: now.get(u, frozenset()) for u in user_ids}


async def redeliveries(client: Client, user_ids: list[str]) -> tuple[int, int]:
    """``user_changed`` signals the users' workflows hold, and how many repeat an earlier one.

    A repeat carries the feed position of a change already delivered: a relay delivered it
    again after a kill (Temporal had accepted it; the outbox delete or the ack had not happened).
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


class _RelayKiller:
    """Kills the relay twice at each mark of the application's commits, and restarts it.

    At a mark the running relay is SIGKILLed wherever it is. The restarted one finds the backlog
    that built while it was down, so its first batch is large: it is killed again at the first
    write SpiceDB acknowledges whose user's outbox rows it still holds (delivered, synced, not
    yet deleted), or, if none comes, :data:`_AIM_WRITES` writes or :data:`_AIM_SECONDS` after it
    started. One kill at a time, each restart a second later, so the count is always the same.
    """

    def __init__(self, scene: Scene, relays: WorkerProcesses) -> None:
        self.scene, self.relays = scene, relays
        self.committed = self.writes = self.kills = self.mid_batch = 0
        self.killed_at: list[str] = []  # the application's commit count at each kill
        self.restarted: list[float] = []
        self._aiming: asyncio.Event | None = None
        self._aim_from = 0
        self._progress = asyncio.Event()

    def commit(self, count: int) -> None:
        """The application has committed ``count`` transactions."""
        self.committed = count
        self._progress.set()

    async def start(self, pause: float = 0.0) -> None:
        """Start a relay (after ``pause``: the application writes on meanwhile); until it runs."""
        await asyncio.sleep(pause)
        since = datetime.now(UTC)
        await self.relays.start()
        await _until_listening(self.scene.pool, since)
        self.restarted.append(time.monotonic())

    async def acknowledged(self, updates: list[RelationshipUpdate]) -> None:
        """A write SpiceDB acknowledged (its Watch stream); the aimed kill's trigger."""
        self.writes += 1
        aiming = self._aiming
        if aiming is None or aiming.is_set():
            return
        written = sorted({u.relationship.subject.object.object_id for u in updates})
        if await _claimed(self.scene.pool, written):
            self.mid_batch += 1
            aiming.set()
        elif self.writes - self._aim_from >= _AIM_WRITES:
            aiming.set()

    async def run(self, marks: list[int]) -> None:
        """Kill and restart at each mark (commit counts), until every mark is served."""
        for mark in marks:
            while self.committed < mark:
                self._progress.clear()
                await self._progress.wait()
            await self._kill("")
            await self.start(_RESTART_AFTER_SECONDS)
            self._aim_from, self._aiming = self.writes, asyncio.Event()
            hits = self.mid_batch
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._aiming.wait(), _AIM_SECONDS)
            self._aiming = None
            await self._kill("*" if self.mid_batch > hits else "")
            await self.start(_RESTART_AFTER_SECONDS)

    async def _kill(self, tag: str) -> None:
        self.kills += await self.relays.crash_all()
        self.killed_at.append(f"{self.committed}{tag}")


async def relay_killed(scene: Scene) -> None:
    """App writes through the outbox; the relay SIGKILLed four times mid-stream, restarted."""
    await scene.pool.execute(APP_TABLE)
    mapping = scene.run.directory / f"spicesync-{scene.task_queue}.toml"
    mapping.write_text(MAPPING)
    scene.workers.extra_env = {"SPICESYNC_CONFIG": str(mapping)}
    relays = replace(
        scene.workers,
        processes=[],
        command=("relay", "outbox"),
        log=scene.run.directory / "relay-relay_killed.log",
        # No metrics or health endpoint (their default ports may be taken); a lost NOTIFY
        # waits one second, not five.
        extra_env={
            "SPICESYNC_OUTBOX_METRICS_ADDRESS": "",
            "SPICESYNC_OUTBOX_HEALTH_ADDRESS": "",
            "SPICESYNC_OUTBOX_POLL_SECONDS": "1",
        },
    )
    changes = list(app_changes(scene.run.users, org=scene.org_id))
    users = list(dict.fromkeys(c.user_id for c in changes))
    real_changes = real_changes_per_user(changes)
    rate = min(APP_RATE, len(changes) / _MIN_STREAM_SECONDS)
    marks = [len(changes) // 4, len(changes) // 2]
    killer = _RelayKiller(scene, relays)
    await scene.workers.start()
    await scene.wait_for_workers()
    await killer.start()
    try:
        async with on_spicedb_writes(scene.spicedb, killer.acknowledged):
            killing = asyncio.create_task(killer.run(marks))
            await _write(scene.pool, changes, rate, killer)
            await killing
            converged = await _converge(scene, users)
        if converged is not None:
            scene.result.recovery_seconds = round(converged - killer.restarted[-1], 1)
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
    if killer.kills != 2 * len(marks):
        scene.result.problems.append(
            f"the relay was killed {killer.kills} times, not {2 * len(marks)}"
        )
        scene.result.passed = False
    signals, repeated = await redeliveries(scene.client, users)
    deleted = sum(1 for c in changes if c.kind == "delete")
    scene.result.notes.append(
        f"{len(changes)} application transactions ({len(users)} inserts, {deleted} deletes) at"
        f" {rate:.0f}/s; relay SIGKILLed {killer.kills} times, restarted"
        f" {_RESTART_AFTER_SECONDS:g} s after each: at transactions {', '.join(map(str, marks))}"
        f" and each restarted one during its first batch ({killer.mid_batch} of those at a"
        f" synced user whose outbox rows it held undeleted); killed after"
        f" {', '.join(killer.killed_at)} transactions (* mid-batch)"
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


async def _write(
    pool: asyncpg.Pool, changes: list[AppChange], rate: float, killer: _RelayKiller
) -> None:
    """Commit the changes in order on one connection, open loop at ``rate`` per second."""
    began = time.monotonic()
    async with pool.acquire() as conn:
        for i, change in enumerate(changes):
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await _commit(conn, change)
            killer.commit(i + 1)


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


async def _converge(scene: Scene, users: list[str]) -> float | None:
    """Wait until the outbox is empty and SpiceDB holds what every row implies; when, or None."""
    deadline = time.monotonic() + _CONVERGE_SECONDS
    while time.monotonic() < deadline:
        if not await scene.pool.fetchval(
            "SELECT count(*) FROM spicesync_outbox"
        ) and follow_in_step(await implied(scene.pool, users), await held_by_user(scene.spicedb)):
            return time.monotonic()
        await asyncio.sleep(1)
    return None
