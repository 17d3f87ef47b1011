"""``spicesync demo``: the main job, end to end on the real engines.

Brings the stack up if needed, runs a worker in this process, creates users through the
``starters`` API the way an application would (a few deliberately bad), then checks every user
independently in PostgreSQL and SpiceDB and prints a summary.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from temporalio.client import Client
from temporalio.runtime import Runtime, TelemetryConfig

from spicesync.errors import InvalidUserInput
from spicesync.logs import sdk_core_logging
from spicesync.models import CreateUserInput, ReconcileInput, ReconcileReport
from spicesync.settings import Settings, load_settings
from spicesync.spicedb import (
    SpiceDBClient,
    connect_configured_spicedb,
    has_org_permission,
    user_memberships,
)
from spicesync.stack.manager import stack_up
from spicesync.temporal import connect_temporal
from starters.reconcile import schedule_as_configured, start_reconcile
from starters.user_events import UserSyncFailed, WaitFor, create_user
from workers.worker import build_worker, open_resources

__all__ = ["DemoCase", "DemoReport", "run_demo"]

_IN_FLIGHT = 50
# How often the demo says how far it is while users are being created.
_PROGRESS_EVERY = 2.0


@dataclass
class DemoCase:
    """One user the demo submits and what must become of it."""

    event: CreateUserInput
    expect: str  # "synced" or the error type it must be rejected with
    outcome: str = ""
    zed_token: str | None = None
    seconds: float = 0.0
    problems: list[str] | None = None


@dataclass
class DemoReport:
    """The demo's figures; ``ok`` only if every outcome and every check was as expected."""

    cases: list[DemoCase]
    wall_seconds: float
    # After the users: a reconcile that repairs whatever earlier runs left (the local SpiceDB
    # keeps its data in memory, so a restarted stack has lost it), then a dry run that must
    # find both stores in agreement.
    repair: ReconcileReport | None = None
    reconcile: ReconcileReport | None = None

    @property
    def failures(self) -> list[DemoCase]:
        """Cases whose outcome or checks were not as expected."""
        return [c for c in self.cases if c.outcome != c.expect or c.problems]

    @property
    def drift(self) -> int:
        """Users the closing dry run found out of sync (-1 if it did not run or repairs failed)."""
        if self.reconcile is None or self.repair is None:
            return -1
        if self.repair.prune_cap_exceeded or self.repair.repairs.failed:
            return -1
        found = self.reconcile.found
        return found.total()

    @property
    def ok(self) -> bool:
        """True when nothing went wrong."""
        return not self.failures and self.drift == 0


def _cases(count: int) -> list[DemoCase]:
    run = uuid.uuid4().hex[:8]
    org = f"demo-{run}"
    cases = [
        DemoCase(
            CreateUserInput(
                user_id=str(uuid.uuid4()),
                email=f"user{i}.{run}@example.com",
                name=f"Demo User {i}",
                org_id=org,
                role="admin" if i % 10 == 0 else "member",
            ),
            "synced",
        )
        for i in range(count)
    ]
    first = cases[0].event
    bad = [
        (dict(email="not-an-email"), "InvalidUserInput"),
        (dict(org_id="org with spaces"), "InvalidUserInput"),
        (dict(role="owner"), "InvalidUserInput"),
        (dict(name=" "), "InvalidUserInput"),
        # Same address as the first user in other letter case: the App DB refuses it, the saga
        # fails for good and leaves nothing behind.
        (dict(email=first.email.upper()), "DuplicateEmail"),
    ]
    for changes, expected in bad:
        fields = first.model_dump() | {"user_id": str(uuid.uuid4())} | changes
        cases.append(DemoCase(CreateUserInput(**fields), expected))
    return cases


async def _submit(case: DemoCase, client: Client, task_queue: str, gate: asyncio.Semaphore) -> None:
    async with gate:
        started = time.perf_counter()
        try:
            outcome = await create_user(
                case.event,
                wait=WaitFor.PERMISSIONS,
                client=client,
                task_queue=task_queue,
            )
            case.outcome, case.zed_token = outcome.status, outcome.zed_token
        except InvalidUserInput:
            case.outcome = "InvalidUserInput"
        except UserSyncFailed as err:
            case.outcome = err.error_type
        case.seconds = time.perf_counter() - started


async def _verify(case: DemoCase, pool: asyncpg.Pool, spicedb: SpiceDBClient) -> None:
    problems: list[str] = []
    row = await pool.fetchrow(
        "SELECT sync_status, zed_token FROM users WHERE id = $1", uuid.UUID(case.event.user_id)
    )
    if case.expect == "synced":
        if row is None:
            problems.append("no row")
        elif row["sync_status"] != "synced" or row["zed_token"] != case.zed_token:
            problems.append(f"row is {row['sync_status']} with another ZedToken")
        for permission, expected in (("view", True), ("manage", case.event.role == "admin")):
            granted = await has_org_permission(
                spicedb,
                user_id=case.event.user_id,
                org_id=case.event.org_id,
                permission=permission,
                zed_token=case.zed_token,
            )
            if granted != expected:
                problems.append(f"CheckPermission({permission}) is {granted}, expected {expected}")
    else:
        if row is not None:
            problems.append("a row was left behind")
        if await user_memberships(spicedb, case.event.user_id):
            problems.append("a relationship was left behind")
    case.problems = problems


async def run_demo(
    users: int,
    *,
    settings: Settings | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoReport:
    """Run the demo and return its report.

    Args:
        users: How many valid users to create (five malformed ones are added).
        settings: Settings; loaded (after ``stack up``) when omitted.
        progress: Told, in a line, what the demo is doing and how far it is.

    Returns:
        The report.
    """
    say = progress or (lambda _line: None)
    say("demo: bringing the local stack up (Temporal, PostgreSQL, SpiceDB)")
    await stack_up(settings or load_settings(), on_ready=schedule_as_configured)
    settings = load_settings()  # now with the stack's connection settings
    # The SDK core's warnings go through logging (plain lines), not raw to the terminal.
    runtime = Runtime(telemetry=TelemetryConfig(logging=sdk_core_logging()))
    client = await connect_temporal(settings, runtime=runtime)
    cases = _cases(users)
    async with open_resources(settings) as resources:
        worker = build_worker(client, resources, task_queue=settings.task_queue)
        async with worker:
            gate = asyncio.Semaphore(_IN_FLIGHT)
            say(
                f"demo: creating {len(cases)} users ({users} valid, {len(cases) - users}"
                f" malformed), {_IN_FLIGHT} at a time"
            )
            started = time.perf_counter()
            # The duplicate email must meet the user it copies already there: with few users
            # all in flight at once, it could win the race and the original be refused instead.
            for wave in (
                [c for c in cases if c.expect != "DuplicateEmail"],
                [c for c in cases if c.expect == "DuplicateEmail"],
            ):
                submitting = asyncio.gather(
                    *(_submit(c, client, settings.task_queue, gate) for c in wave)
                )
                while not submitting.done():
                    await asyncio.wait({submitting}, timeout=_PROGRESS_EVERY)
                    answered = sum(1 for c in cases if c.outcome)
                    say(f"demo: {answered}/{len(cases)} users answered")
                await submitting
            wall = time.perf_counter() - started
            say("demo: checking every user in PostgreSQL and SpiceDB")
            spicedb = connect_configured_spicedb(settings)
            try:
                await asyncio.gather(*(_verify(c, resources.pool, spicedb) for c in cases))
            finally:
                await spicedb.close()
            # Then prove it for the whole of both stores, not only for this run's users.
            say("demo: reconciling both stores (repair what earlier runs left, then a dry run)")
            repair = await _reconcile(client, settings.task_queue, dry_run=False)
            reconcile = await _reconcile(client, settings.task_queue, dry_run=True)
    return DemoReport(cases=cases, wall_seconds=wall, repair=repair, reconcile=reconcile)


async def _reconcile(client: Client, task_queue: str, *, dry_run: bool) -> ReconcileReport:
    handle = await start_reconcile(
        ReconcileInput(dry_run=dry_run),
        client=client,
        task_queue=task_queue,
        workflow_id=f"demo-reconcile-{uuid.uuid4().hex[:8]}",
    )
    return await handle.result()


def summary(report: DemoReport, ui_url: str | None) -> str:
    """The demo's human-readable summary."""
    synced = [c for c in report.cases if c.expect == "synced"]
    rejected = [c for c in report.cases if c.expect != "synced" and c.outcome == c.expect]
    latencies = sorted(c.seconds * 1000 for c in synced if c.outcome == "synced")
    lines = [
        "spicesync demo",
        f"  users created and synced : {sum(c.outcome == 'synced' for c in synced)}/{len(synced)}",
        f"  bad events rejected      : {len(rejected)}/{len(report.cases) - len(synced)}"
        " (clear error, nothing written)",
        f"  throughput               : {len(synced) / report.wall_seconds:.1f} users/s"
        f" ({report.wall_seconds:.2f} s wall, {_IN_FLIGHT} in flight)",
    ]
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        lines.append(
            f"  time-to-permission       : p50 {statistics.median(latencies):.0f} ms,"
            f" p99 {p99:.0f} ms"
        )
    lines.append(
        "  verified independently  : row + ZedToken in PostgreSQL, CheckPermission"
        " at_least_as_fresh in SpiceDB, nothing left for rejected events"
    )
    if report.repair is not None:
        r = report.repair
        found = r.found.total()
        lines.append(
            f"  reconcile (apply)        : {found} drifted users from earlier runs,"
            f" {r.repairs.repaired} repaired, {r.repairs.failed} failed"
            + (" — PRUNE CAP EXCEEDED, nothing deleted" if r.prune_cap_exceeded else "")
        )
    if report.reconcile is not None:
        r = report.reconcile
        lines.append(
            f"  reconcile (dry run)      : {r.message.rstrip('.')} ({r.rows_scanned} rows,"
            f" {r.relationships_scanned} relationships scanned in {r.seconds:.1f} s)"
        )
    for case in report.failures:
        lines.append(
            f"  UNEXPECTED user {case.event.user_id}: expected {case.expect}, got"
            f" {case.outcome or 'nothing'} {'; '.join(case.problems or [])}"
        )
    lines.append(f"  result                   : {'OK' if report.ok else 'FAILED'}")
    if ui_url:
        lines.append(f"  Temporal UI              : {ui_url}/namespaces/default/workflows")
        lines.append(
            "  decrypted payloads in UI : sign in to the codec server (its /login page, token"
            " from `spicesync stack env --show-secrets`): docs/security.md"
        )
    return "\n".join(lines)
