"""``spicesync demo --follow``: follow mode end to end, the way an application adopts it.

The application here owns its table (``follow_demo.accounts``, examples/follow/app.sql) and its
SpiceDB schema (examples/follow/schema.zed), and knows nothing of spicesync but one statement:
every transaction that changes an account also inserts the account's id into
``spicesync_outbox``. The demo runs a worker (with the mapping examples/follow/spicesync.toml)
and an outbox relay in this process, writes accounts with plain SQL (inserts, updates, deletes,
a burst of changes to one account, one row the mapping cannot express), writes one relation of
the application's own, and then checks SpiceDB independently against what it wrote: every
account's relationships, the application's relation, and the failed row in the bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from authzed.api.v1 import (
    Consistency,
    ObjectReference,
    ReadRelationshipsRequest,
    Relationship,
    RelationshipFilter,
    RelationshipUpdate,
    SubjectFilter,
    SubjectReference,
    WriteRelationshipsRequest,
)
from temporalio.runtime import Runtime, TelemetryConfig

from spicesync.logs import sdk_core_logging
from spicesync.mapping import load_mapping
from spicesync.settings import Settings, load_settings
from spicesync.spicedb import SpiceDBClient, connect_spicedb, write_schema
from spicesync.stack.manager import stack_up
from spicesync.temporal import connect_temporal
from workers.outbox_relay import run_outbox_relay
from workers.worker import build_worker, open_resources

__all__ = ["EXAMPLE_DIR", "FollowDemoReport", "follow_summary", "run_follow_demo"]

# The application's files, read from the checkout (the demo is a development tool).
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "follow"
_TASK_QUEUE = "spicesync-follow-demo"
_IN_FLIGHT = 20
_BURST = 30
_SETTLE_SECONDS = 180.0
_PROGRESS_EVERY = 2.0


@dataclass
class Account:
    """What the application last wrote for one account (the demo's own record of it)."""

    account_id: int
    team_id: str | None
    is_admin: bool
    squad: str | None
    squad_role: str | None
    version: int = 1
    deleted: bool = False
    committed_at: float = 0.0

    def expected(self) -> set[str]:
        """The relationships the application means this account to have, as text."""
        if self.deleted:
            return set()
        found = set()
        if self.team_id is not None:
            relation = "admin" if self.is_admin else "member"
            found.add(f"workspace:{self.team_id}#{relation}")
        if self.squad is not None and self.squad_role is not None:
            found.add(f"team:{self.squad}#{self.squad_role}")
        return found


@dataclass
class FollowDemoReport:
    """The follow demo's figures; ``ok`` only if every check held."""

    accounts: list[Account]
    inserts: int
    updates: int
    deletes: int
    delivered: int
    wall_seconds: float
    settle_seconds: float
    latencies_ms: list[float]
    owner_kept: bool
    unmappable_failed: bool
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing went wrong."""
        return not self.problems and self.owner_kept and self.unmappable_failed


def _example(name: str) -> Path:
    path = EXAMPLE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the follow demo runs from a spicesync checkout")
    return path


async def _commit(pool: asyncpg.Pool, sql: str, *args: object) -> tuple[int, int | None]:
    """The application's one transaction: its own write, and the outbox insert beside it."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(sql, *args)
        assert row is not None
        await conn.execute(
            "INSERT INTO spicesync_outbox (user_id, version) VALUES ($1, $2)",
            str(row["account_id"]),
            row["row_version"],
        )
    return int(row["account_id"]), row["row_version"]


_INSERT = """
INSERT INTO follow_demo.accounts (email, team_id, is_admin, squad, squad_role)
VALUES ($1, $2, $3, $4, $5) RETURNING account_id, row_version
"""
_UPDATE = """
UPDATE follow_demo.accounts
SET team_id = $2, is_admin = $3, squad = $4, squad_role = $5, row_version = row_version + 1,
    updated_at = now()
WHERE account_id = $1 RETURNING account_id, row_version
"""
_DELETE = """
DELETE FROM follow_demo.accounts WHERE account_id = $1
RETURNING account_id, NULL::bigint AS row_version
"""


async def _insert(pool: asyncpg.Pool, run: str, index: int) -> Account:
    team = f"{run}-t{index % 5}"
    squad = None if index % 13 == 12 else f"{run}-s{index % 7}"
    role = "lead" if index % 7 == 0 else "member"
    account_id, _ = await _commit(
        pool, _INSERT, f"user{index}.{run}@example.com", team, index % 10 == 0, squad, role
    )
    account = Account(account_id, team, index % 10 == 0, squad, role)
    account.committed_at = time.time()
    return account


async def _update(pool: asyncpg.Pool, account: Account) -> None:
    _, version = await _commit(
        pool,
        _UPDATE,
        account.account_id,
        account.team_id,
        account.is_admin,
        account.squad,
        account.squad_role,
    )
    account.version = version or account.version


async def _delete(pool: asyncpg.Pool, account: Account) -> None:
    await _commit(pool, _DELETE, account.account_id)
    account.deleted = True


def _account_ref(account_id: int) -> SubjectReference:
    return SubjectReference(
        object=ObjectReference(object_type="account", object_id=str(account_id))
    )


async def _held(spicedb: SpiceDBClient, account_id: int) -> set[str]:
    """The relationships SpiceDB holds for the account that the mapping manages."""
    held = set()
    for resource_type in ("workspace", "team"):
        async for r in spicedb.ReadRelationships(
            ReadRelationshipsRequest(
                consistency=Consistency(fully_consistent=True),
                relationship_filter=RelationshipFilter(
                    resource_type=resource_type,
                    optional_subject_filter=SubjectFilter(
                        subject_type="account", optional_subject_id=str(account_id)
                    ),
                ),
            ),
            timeout=10,
        ):
            rel = r.relationship
            if rel.relation == "owner":
                continue  # the application's own relation, checked on its own
            held.add(f"{rel.resource.object_type}:{rel.resource.object_id}#{rel.relation}")
    return held


async def _write_owner(spicedb: SpiceDBClient, workspace: str, account_id: int) -> None:
    """The application's own relation, written by the application, not by spicesync."""
    await spicedb.WriteRelationships(
        WriteRelationshipsRequest(
            updates=[
                RelationshipUpdate(
                    operation=RelationshipUpdate.Operation.OPERATION_TOUCH,
                    relationship=Relationship(
                        resource=ObjectReference(object_type="workspace", object_id=workspace),
                        relation="owner",
                        subject=_account_ref(account_id),
                    ),
                )
            ]
        ),
        timeout=10,
    )


@contextlib.asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[tuple[asyncpg.Pool, SpiceDBClient]]:
    """A follow-mode worker and an outbox relay, in this process, for the demo's queue."""
    runtime = Runtime(telemetry=TelemetryConfig(logging=sdk_core_logging()))
    client = await connect_temporal(settings, runtime=runtime)
    stop = asyncio.Event()
    async with open_resources(settings) as resources:
        worker = build_worker(client, resources, task_queue=_TASK_QUEUE, settings=settings)
        async with worker:
            relay = asyncio.create_task(run_outbox_relay(settings, stop=stop, client=client))
            try:
                yield resources.pool, resources.spicedb
            finally:
                stop.set()
                await relay


async def run_follow_demo(
    users: int,
    *,
    settings: Settings | None = None,
    progress: Callable[[str], None] | None = None,
) -> FollowDemoReport:
    """Run the follow demo and return its report.

    Args:
        users: How many accounts the application inserts (at least 20).
        settings: Settings; loaded (after ``stack up``) when omitted.
        progress: Told, in a line, what the demo is doing.

    Returns:
        The report.
    """
    say = progress or (lambda _line: None)
    users = max(users, 20)
    say("demo --follow: bringing the local stack up (Temporal, PostgreSQL, SpiceDB)")
    await stack_up(settings or load_settings())
    mapping_path = _example("spicesync.toml")
    # The relay runs in this process: no health port to take (or find taken) for a demo.
    settings = load_settings(
        config_path=mapping_path, task_queue=_TASK_QUEUE, outbox_health_address=""
    )
    load_mapping(mapping_path)  # a clear error here rather than in the worker
    say("demo --follow: the application's table (follow_demo.accounts) and SpiceDB schema")
    setup = await asyncpg.connect(settings.require_database_url(), timeout=10)
    try:
        await setup.execute(_example("app.sql").read_text(encoding="utf-8"))
    finally:
        await setup.close()
    spicedb = connect_spicedb(*settings.require_spicedb(), insecure=settings.spicedb_insecure)
    try:
        await write_schema(spicedb, _example("schema.zed").read_text(encoding="utf-8"))
    finally:
        await spicedb.close()

    run = f"demo-{uuid.uuid4().hex[:8]}"
    async with _running(settings) as (pool, spicedb):
        started = time.perf_counter()
        gate = asyncio.Semaphore(_IN_FLIGHT)

        async def insert(index: int) -> Account:
            async with gate:
                return await _insert(pool, run, index)

        say(f"demo --follow: the application inserts {users} accounts ({_IN_FLIGHT} at a time)")
        accounts = list(await asyncio.gather(*(insert(i) for i in range(users))))
        owner = accounts[0]
        assert owner.team_id is not None
        await _write_owner(spicedb, owner.team_id, owner.account_id)

        say("demo --follow: updates, deletes, a burst of changes to one account, one bad row")
        changed = accounts[1 : 1 + users // 10]
        moved = accounts[1 + users // 10 : 1 + users // 5]
        deleted = [owner, *accounts[-max(2, users // 20) :]]
        for account in changed:
            account.is_admin = not account.is_admin
        for account in moved:
            account.team_id, account.squad = f"{run}-t9", None
        updates = len(changed) + len(moved)
        await asyncio.gather(*(_update(pool, a) for a in changed + moved))
        await asyncio.gather(*(_delete(pool, a) for a in deleted))
        burst = accounts[users // 2]
        for step in range(_BURST):
            burst.is_admin = step % 2 == 0
            burst.squad_role = "lead" if step % 3 == 0 else "member"
            await _update(pool, burst)
        updates += _BURST
        bad = accounts[users // 2 + 1]
        bad.squad_role, bad.squad = "boss", bad.squad or f"{run}-s0"  # not in the mapping
        await _update(pool, bad)
        wall = time.perf_counter() - started

        say("demo --follow: waiting for SpiceDB to follow, then checking it independently")
        settle_started = time.perf_counter()
        problems = await _settle(pool, spicedb, [a for a in accounts if a is not bad], say)
        settle = time.perf_counter() - settle_started
        unmappable_failed = await _failed_in_bookkeeping(pool, bad)
        owner_kept = await _owner_kept(spicedb, owner)
        latencies = await _latencies(pool, [a for a in accounts if a.version == 1])
        delivered = int(
            await pool.fetchval(
                "SELECT count(*) FROM spicesync_followed_users WHERE user_id = ANY($1)",
                [str(a.account_id) for a in accounts],
            )
        )
    return FollowDemoReport(
        accounts=accounts,
        inserts=users,
        updates=updates + 1,
        deletes=len(deleted),
        delivered=delivered,
        wall_seconds=wall,
        settle_seconds=settle,
        latencies_ms=latencies,
        owner_kept=owner_kept,
        unmappable_failed=unmappable_failed,
        problems=problems,
    )


async def _settle(
    pool: asyncpg.Pool, spicedb: SpiceDBClient, accounts: list[Account], say: Callable[[str], None]
) -> list[str]:
    """Wait until spicesync reports every change applied, then check SpiceDB independently.

    The wait reads spicesync's bookkeeping (cheap); the verdict reads SpiceDB itself, and is
    taken again until it holds or the time is up.
    """
    deadline = time.monotonic() + _SETTLE_SECONDS
    last_note = 0.0
    while time.monotonic() < deadline:
        rows = await pool.fetch(
            "SELECT user_id, applied_version FROM spicesync_followed_users"
            " WHERE user_id = ANY($1) AND status = 'synced'",
            [str(a.account_id) for a in accounts],
        )
        applied = {r["user_id"]: r["applied_version"] for r in rows}
        behind = [
            a
            for a in accounts
            if str(a.account_id) not in applied
            or applied[str(a.account_id)] != (None if a.deleted else a.version)
        ]
        backlog = int(await pool.fetchval("SELECT count(*) FROM spicesync_outbox"))
        if not behind and backlog == 0:
            break
        if time.monotonic() - last_note > _PROGRESS_EVERY:
            last_note = time.monotonic()
            say(
                f"demo --follow: {len(accounts) - len(behind)}/{len(accounts)} accounts synced,"
                f" {backlog} outbox rows waiting"
            )
        await asyncio.sleep(0.25)
    while True:
        held = await asyncio.gather(*(_held(spicedb, a.account_id) for a in accounts))
        wrong = [a for a, h in zip(accounts, held, strict=True) if h != a.expected()]
        backlog = int(await pool.fetchval("SELECT count(*) FROM spicesync_outbox"))
        if (not wrong and backlog == 0) or time.monotonic() > deadline:
            return [
                f"account {a.account_id}: SpiceDB holds other relationships than the row implies"
                for a in wrong
            ] + ([f"{backlog} outbox rows never delivered"] if backlog else [])
        await asyncio.sleep(1.0)


async def _failed_in_bookkeeping(pool: asyncpg.Pool, bad: Account) -> bool:
    """The unmappable row must be recorded as failed, and nothing deleted from the app's table."""
    deadline = time.monotonic() + _SETTLE_SECONDS
    while time.monotonic() < deadline:
        status = await pool.fetchval(
            "SELECT status FROM spicesync_followed_users WHERE user_id = $1", str(bad.account_id)
        )
        if status == "failed":
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM follow_demo.accounts WHERE account_id = $1",
                    bad.account_id,
                )
            )
        await asyncio.sleep(0.2)
    return False


async def _owner_kept(spicedb: SpiceDBClient, owner: Account) -> bool:
    """The application's own relation survives its account's deletion and every sync."""
    found = [
        r
        async for r in spicedb.ReadRelationships(
            ReadRelationshipsRequest(
                consistency=Consistency(fully_consistent=True),
                relationship_filter=RelationshipFilter(
                    resource_type="workspace",
                    optional_relation="owner",
                    optional_subject_filter=SubjectFilter(
                        subject_type="account", optional_subject_id=str(owner.account_id)
                    ),
                ),
            ),
            timeout=10,
        )
    ]
    return len(found) == 1


async def _latencies(pool: asyncpg.Pool, accounts: list[Account]) -> list[float]:
    """From the application's commit to spicesync recording the sync, for inserted accounts."""
    rows = await pool.fetch(
        "SELECT user_id, extract(epoch FROM synced_at) AS at FROM spicesync_followed_users"
        " WHERE user_id = ANY($1) AND synced_at IS NOT NULL",
        [str(a.account_id) for a in accounts],
    )
    committed = {str(a.account_id): a.committed_at for a in accounts}
    return sorted(max(0.0, (float(r["at"]) - committed[r["user_id"]]) * 1000) for r in rows)


def follow_summary(report: FollowDemoReport) -> str:
    """The follow demo's human-readable summary."""
    live = [a for a in report.accounts if not a.deleted]
    lines = [
        "spicesync demo --follow (the application owns follow_demo.accounts; spicesync follows)",
        f"  application writes       : {report.inserts} inserts, {report.updates} updates"
        f" (a burst of {_BURST} to one account), {report.deletes} deletes — plain SQL, each"
        " with one outbox insert in the same transaction",
        f"  writing took             : {report.wall_seconds:.2f} s; SpiceDB in step"
        f" {report.settle_seconds:.2f} s later",
        f"  SpiceDB follows the table: {len(live) - 1} live accounts hold exactly what their row"
        f" implies, {report.deletes} deleted accounts hold nothing"
        if not report.problems
        else f"  SpiceDB follows the table: {len(report.problems)} PROBLEMS",
        f"  application's own relation: workspace#owner of a deleted account "
        f"{'kept' if report.owner_kept else 'LOST'} (spicesync never touches unmanaged relations)",
        "  unmappable row           : "
        f"{'recorded as failed' if report.unmappable_failed else 'NOT recorded'}"
        " in spicesync_followed_users (listed by `spicesync stuck`), the app's row untouched",
    ]
    if report.latencies_ms:
        lat = report.latencies_ms
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        lines.append(
            f"  commit → synced          : p50 {statistics.median(lat):.0f} ms, p99 {p99:.0f} ms"
            f" ({len(lat)} inserted accounts)"
        )
    lines += [f"  PROBLEM {p}" for p in report.problems[:20]]
    lines.append(f"  result                   : {'OK' if report.ok else 'FAILED'}")
    return "\n".join(lines)
