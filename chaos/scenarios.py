"""The fault scenarios. Each drives real load through real workers while it breaks something.

Every scenario fills its :class:`~chaos.verdict.ScenarioResult` through
:meth:`chaos.scene.Scene.finish`, which waits for every accepted user's outcome and judges the
stores independently. Faults are timed by what the stores report (a commit, an acknowledged
SpiceDB write), never by hooks inside spicesync.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

from authzed.api.v1 import RelationshipUpdate
from temporalio.api.enums.v1 import EventType

from chaos.faults import inject_fault, on_commits, on_spicedb_writes
from chaos.follow import relay_killed
from chaos.follow_cdc import cdc_relay_killed
from chaos.follow_nats import nats_relay_killed
from chaos.load import Delivery, collect_outcomes, offer, user_batch
from chaos.poison import case_variants, poison_cases
from chaos.proxy import FaultProxy, postgres_route
from chaos.scene import Scene
from chaos.verdict import judge_leaks, unsettled_workflows
from spicesync.constants import user_workflow_id
from spicesync.models import CreateUserInput, Membership, ReconcileInput
from spicesync.spicedb import holds_memberships
from starters.reconcile import start_reconcile
from starters.stuck import find_stuck, find_unfinished
from starters.user_events import EventNotAccepted, WaitFor, create_user

__all__ = ["PREVIOUS_RELEASE", "SCENARIOS"]

# The last commit whose user-sync workflow ran every step as a normal activity: scenario
# `code_change_deployed` starts workflows on that code and finishes them on this checkout's.
PREVIOUS_RELEASE = "fd7928a8e6b18f1e331f89620d7d46a192b00755"


async def _crash_and_replace(scene: Scene, times: list[float], label: str) -> None:
    """SIGKILL the worker and start a new one; ``times`` gets when the new one was started."""
    killed = await scene.workers.crash_all()
    await scene.workers.start()
    times.append(time.monotonic())
    scene.result.notes.append(f"{label}: {killed} worker(s) killed")


async def worker_killed_after_pg_commit(scene: Scene) -> None:
    """SIGKILL the worker the moment a creation's row commits, three times under load."""

    def trigger(hit: Callable[[], Coroutine[Any, Any, None]]) -> Any:
        async def committed(op: str) -> None:
            if op == "INSERT":
                await hit()

        return on_commits(scene.database_url, committed)

    await _kill_on(scene, trigger, "after commit")


async def worker_killed_after_spicedb_ack(scene: Scene) -> None:
    """SIGKILL the worker the moment SpiceDB acknowledges a write, three times under load."""

    def trigger(hit: Callable[[], Coroutine[Any, Any, None]]) -> Any:
        async def acknowledged(_updates: list[RelationshipUpdate]) -> None:
            await hit()

        return on_spicedb_writes(scene.spicedb, acknowledged)

    await _kill_on(scene, trigger, "after SpiceDB write")


async def _kill_on(
    scene: Scene,
    trigger: Callable[[Callable[[], Coroutine[Any, Any, None]]], Any],
    label: str,
) -> None:
    """Crash and replace the worker at the ¼, ½ and ¾ marks of what ``trigger`` reports."""
    users = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    marks = {len(users) // 4, len(users) // 2, 3 * len(users) // 4}
    seen, restarted = 0, list[float]()
    lock = asyncio.Lock()

    async def hit() -> None:
        nonlocal seen
        async with lock:
            seen += 1
            if seen in marks:
                await _crash_and_replace(scene, restarted, f"{label} #{seen}")

    await scene.workers.start()
    await scene.wait_for_workers()
    async with trigger(hit):
        delivery = await offer(scene.client, scene.task_queue, users)
        outcomes = await collect_outcomes(
            scene.client, scene.task_queue, _accepted(users, delivery)
        )
    await _finish(scene, users, delivery, restarted, outcomes)


# The app's offered rate in the overload scenario: well above what this box syncs per second,
# so a backlog builds behind the workers and workflow tasks wait longer than their timeout.
OVERLOAD_RATE = 50.0
# How long the app lets the starter retry a refused call before it gives up on the event.
_OVERLOAD_ACCEPT_WITHIN = timedelta(seconds=20)


async def worker_killed_under_overload(scene: Scene) -> None:
    """Creations offered open-loop above the box's peak; the worker SIGKILLed three times.

    The app gives up on a call the starter could not get accepted within its deadline and
    never sends that event again, so nothing but spicesync itself can finish what it started:
    every user must end synced or with nothing in either store, and ``stuck`` and a reconcile
    must agree that nothing is left half-written.
    """
    users = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    restarted: list[float] = []
    accepted: dict[str, float] = {}
    gave_up: dict[str, str] = {}
    await scene.workers.start()
    await scene.wait_for_workers()

    async def create(user: CreateUserInput) -> None:
        try:
            await create_user(
                user,
                wait=WaitFor.START,
                client=scene.client,
                task_queue=scene.task_queue,
                accept_within=_OVERLOAD_ACCEPT_WITHIN,
            )
        except EventNotAccepted as err:
            gave_up[user.user_id] = err.last_error
            return
        accepted[user.user_id] = time.monotonic()

    offering = len(users) / OVERLOAD_RATE
    calls: list[asyncio.Task[None]] = []

    async def crashes() -> None:
        for mark in (0.25, 0.5, 0.75):
            await asyncio.sleep(offering / 4)
            await _crash_and_replace(scene, restarted, f"under overload at {mark:.0%} offered")

    crashing = asyncio.create_task(crashes())
    for user in users:
        calls.append(asyncio.create_task(create(user)))
        await asyncio.sleep(1 / OVERLOAD_RATE)
    await asyncio.gather(*calls)
    await crashing
    # A call the app gave up on may still have been accepted, and its sync may still be
    # running: judge the stores only once no sync of this scenario is mid-way.
    await _until_settled(scene, timeout=600)
    settled = [u for u in users if u.user_id in accepted]
    outcomes = await collect_outcomes(scene.client, scene.task_queue, settled)
    await scene.finish(
        settled,
        healed_at=_last(restarted),
        outcomes=outcomes,
        unaccepted=[u for u in users if u.user_id not in accepted],
    )
    scene.result.users = len(users)
    scene.result.notes.append(
        f"{len(users)} creations offered at {OVERLOAD_RATE:g}/s; {len(gave_up)} calls given up"
        f" after {_OVERLOAD_ACCEPT_WITHIN.total_seconds():g} s of retries"
    )
    await _stuck_and_reconcile_agree(scene, {u.user_id for u in users})


async def _until_settled(scene: Scene, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    quiet = 0
    # Twice in a row, seconds apart: visibility lags a stage update by about a second.
    while quiet < 2 and time.monotonic() < deadline:
        busy = await unsettled_workflows(scene.client, scene.task_queue)
        quiet = quiet + 1 if busy == 0 else 0
        await asyncio.sleep(2)


async def _stuck_and_reconcile_agree(scene: Scene, user_ids: set[str]) -> None:
    """Neither ``spicesync stuck`` nor a reconcile may find anything left half-written."""
    stuck = await find_stuck(scene.client, older_than=timedelta(0))
    unfinished = await find_unfinished(scene.client, scene.pool, older_than=timedelta(0))
    ours = [s for s in stuck if s.user_id in user_ids]
    if ours or unfinished:
        scene.result.problems.append(
            f"stuck lists {len(ours)} syncs and {len(unfinished)} unfinished creations"
        )
    handle = await start_reconcile(
        ReconcileInput(dry_run=True, unfinished_after_seconds=0),
        client=scene.client,
        task_queue=scene.task_queue,
        workflow_id=f"chaos-reconcile-{uuid.uuid4().hex[:8]}",
    )
    report = await handle.result()
    if report.found.total() or report.in_flight_skipped:
        scene.result.problems.append(
            f"reconcile (dry run) found {report.found.total()} drifted users and skipped"
            f" {report.in_flight_skipped} live syncs: {report.message}"
        )
    scene.result.notes.append(f"stuck: nothing; reconcile (dry run): {report.message}")


async def temporal_restarted(scene: Scene) -> None:
    """Crash the Temporal server (file-backed) with a third of the load accepted; restart it."""
    users = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    healed: list[float] = []

    async def fault() -> None:
        scene.run.temporal.kill()
        await asyncio.sleep(3)
        await scene.run.temporal.start()
        healed.append(time.monotonic())
        scene.result.notes.append("Temporal server SIGKILLed, restarted after 3 s")

    delivery = await _offer_with_fault(scene, users, len(users) // 3, fault)
    await _finish(scene, users, delivery, healed)


async def spicedb_data_lost(scene: Scene) -> None:
    """Crash SpiceDB mid-load and bring it back empty; a reconcile must restore what was lost."""
    # Workers reach SpiceDB through a proxy that refuses connections while the engine is down
    # and until its schema is written again, as a deployment bootstraps the schema before it
    # serves (an empty schema alone parks syncs as a schema mismatch, for an operator to resume).
    async with FaultProxy(("127.0.0.1", scene.engine.port)) as proxy:
        scene.workers.spicedb_endpoint = proxy.address
        await _restore_after_data_loss(scene, proxy)


async def _restore_after_data_loss(scene: Scene, proxy: FaultProxy) -> None:
    users = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    healed: list[float] = []

    async def fault() -> None:
        await proxy.refuse()
        scene.engine.kill()
        await scene.engine.start()  # same port and key, empty datastore, schema written
        await proxy.restore()
        healed.append(time.monotonic())

    delivery = await _offer_with_fault(scene, users, len(users) // 2, fault)
    accepted = _accepted(users, delivery)
    outcomes = await collect_outcomes(scene.client, scene.task_queue, accepted)

    held = await holds_memberships(
        scene.spicedb,
        [Membership(user_id=u.user_id, org_id=u.org_id, role=u.role) for u in accepted],
    )
    missing = sum(1 for h in held if not h)
    handle = await start_reconcile(
        ReconcileInput(dry_run=False),
        client=scene.client,
        task_queue=scene.task_queue,
        workflow_id=f"chaos-reconcile-{uuid.uuid4().hex[:8]}",
    )
    report = await handle.result()
    scene.result.notes.append(
        f"{missing} synced users lost their relationships with the datastore;"
        f" reconcile repaired {report.repairs.repaired}"
    )
    await scene.finish(accepted, healed_at=_last(healed), outcomes=outcomes)
    _count_rejections(scene, users, delivery)


async def postgres_unreachable(scene: Scene) -> None:
    """PostgreSQL refuses connections for the outage, mid-load (existing ones reset)."""
    target, rewrite = postgres_route(scene.database_url)
    async with FaultProxy(target) as proxy:
        scene.workers.database_url = rewrite(proxy.port)
        await _outage(scene, proxy, "PostgreSQL")


async def spicedb_unreachable(scene: Scene) -> None:
    """SpiceDB refuses connections for the outage, mid-load (existing ones reset)."""
    async with FaultProxy(("127.0.0.1", scene.engine.port)) as proxy:
        scene.workers.spicedb_endpoint = proxy.address
        await _outage(scene, proxy, "SpiceDB")


async def wrong_preshared_key(scene: Scene) -> None:
    """A worker deployed with a wrong SpiceDB key refuses to start; events wait, then sync."""
    users = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    right = scene.workers.spicedb_key
    scene.workers.spicedb_key = "not-the-key"
    bad = await scene.workers.start()
    code = await asyncio.wait_for(bad.wait(), 60)
    scene.workers.processes.clear()
    scene.result.notes.append(f"the worker with the wrong key exited with status {code}")
    if code != 2:
        scene.result.problems.append(f"a worker with a wrong key exited with {code}, not 2")
    # The app's calls wait (no worker can accept them) while the operator fixes the key.
    offering = asyncio.create_task(offer(scene.client, scene.task_queue, users))
    await asyncio.sleep(5)
    rows = await scene.pool.fetchval("SELECT count(*) FROM users")
    if rows:
        scene.result.problems.append(f"{rows} rows written while no worker could reach SpiceDB")
    scene.workers.spicedb_key = right
    await scene.workers.start()
    healed = time.monotonic()
    delivery = await offering
    await _finish(scene, users, delivery, [healed])


async def duplicate_delivery(scene: Scene) -> None:
    """Every event delivered twice at the same time (two calls in flight for each user)."""
    users = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    await scene.workers.start()
    await scene.wait_for_workers()
    twice = [u for u in users for _ in range(2)]
    delivery = await offer(scene.client, scene.task_queue, twice)
    accepted = _accepted(users, delivery)
    first, second = await asyncio.gather(
        collect_outcomes(scene.client, scene.task_queue, accepted),
        collect_outcomes(scene.client, scene.task_queue, accepted),
    )
    if first != second:
        differing = sum(1 for u in first if first[u] != second.get(u))
        scene.result.problems.append(f"{differing} users got different outcomes for one event")
    await scene.finish(accepted, healed_at=None, outcomes=first)
    _count_rejections(scene, users, delivery)


async def poison_inputs(scene: Scene) -> None:
    """Malformed events among healthy ones; emails that differ only in case race each other."""
    healthy = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    poison = poison_cases(max(200, scene.run.users // 5), org_id=scene.org_id, seed=7)
    pairs = case_variants(scene.org_id, seed=7)
    variants = [u for pair in pairs for u in pair]
    await scene.workers.start()
    await scene.wait_for_workers()
    mixed: list[CreateUserInput] = [*healthy, *variants]
    for i, case in enumerate(poison):
        mixed.insert((i * 7) % len(mixed), case.user)
    delivery = await offer(scene.client, scene.task_queue, mixed)
    for case in poison:
        reason = delivery.rejected.get(case.user.user_id, "")
        if not reason.startswith("InvalidUserInput") or case.field not in reason:
            scene.result.problems.append(f"poison {case.label!r} not rejected clearly: {reason!r}")
    accepted = _accepted([*healthy, *variants], delivery)
    outcomes = await collect_outcomes(scene.client, scene.task_queue, accepted)
    expect_failed = {}
    for a, b in pairs:
        loser = b if outcomes.get(a.user_id) == "synced" else a
        expect_failed[loser.user_id] = "DuplicateEmail"
    started = (await scene.client.count_workflows(f"TaskQueue = '{scene.task_queue}'")).count
    if started != len(accepted):
        scene.result.problems.append(f"{started} workflows for {len(accepted)} accepted events")
    await scene.finish(accepted, healed_at=None, expect_failed=expect_failed, outcomes=outcomes)
    scene.result.users = len(mixed)
    scene.result.rejected = sum(1 for c in poison if c.user.user_id in delivery.rejected)
    scene.result.notes.append(
        f"{len(poison)} poison events in {len({c.label for c in poison})} kinds;"
        f" {len(pairs)} email pairs differing only in case"
    )
    # No email or name of any event, refused or not, may reach a span or a log line.
    await scene.workers.stop_all()  # each worker flushes its last spans as it stops
    judge_leaks(scene.result, spans=scene.workers.trace_file, logs=[scene.workers.log], users=mixed)


async def worker_killed_during_compensation(scene: Scene) -> None:
    """A fifth of the users fail for good at the last step; the worker is killed mid-rollback."""
    users = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    doomed = [u.user_id for u in users[::5]]
    # 23514 (check violation) is permanent: storing the ZedToken on the row fails after the
    # SpiceDB write landed, so the event compensates (SpiceDB restored, the row removed).
    await inject_fault(scene.pool, doomed, "UPDATE", "23514")
    kills, restarted = 0, list[float]()
    lock = asyncio.Lock()

    async def acknowledged(updates: list[RelationshipUpdate]) -> None:
        nonlocal kills
        # A membership deleted is a rollback's SpiceDB half; its row's removal comes next.
        if not any(u.operation == RelationshipUpdate.OPERATION_DELETE for u in updates):
            return
        async with lock:
            if kills < 3:
                kills += 1
                await _crash_and_replace(scene, restarted, f"during rollback #{kills}")

    await scene.workers.start()
    await scene.wait_for_workers()
    async with on_spicedb_writes(scene.spicedb, acknowledged):
        delivery = await offer(scene.client, scene.task_queue, users)
        accepted = _accepted(users, delivery)
        outcomes = await collect_outcomes(scene.client, scene.task_queue, accepted)
    if kills == 0:
        scene.result.problems.append("no rollback was seen, so no worker was killed during one")
    await scene.finish(
        accepted,
        healed_at=_last(restarted),
        expect_failed={u: "AppDBRejectedAfterWrite" for u in doomed},
        outcomes=outcomes,
    )
    _count_rejections(scene, users, delivery)


async def code_change_deployed(scene: Scene) -> None:
    """Syncs started on the previous release, held mid-saga, then finished by this code."""
    previous = await asyncio.to_thread(_previous_release, scene.run.directory)
    half = scene.run.users // 2
    early = max(1, scene.run.users // 20)
    old_users = user_batch(f"old-{scene.task_queue}", half, org_id=scene.org_id)
    # Sent by an app upgraded before its workers: the previous release ignores the signal.
    early_users = user_batch(f"early-{scene.task_queue}", early, org_id=scene.org_id)
    new_users = user_batch(
        f"new-{scene.task_queue}", scene.run.users - half - early, org_id=scene.org_id
    )
    await scene.workers.start(code_dir=previous)
    await scene.wait_for_workers()
    # SpiceDB answers nothing (SIGSTOP): the previous release's syncs stop mid-saga.
    os.kill(scene.engine.pid, signal.SIGSTOP)
    try:
        # The previous release's app: its WaitFor.START waited for a worker to take the event.
        delivery = await offer(scene.client, scene.task_queue, old_users, wait=WaitFor.ACCEPTED)
        await offer(scene.client, scene.task_queue, early_users, delivery=delivery)
        await asyncio.sleep(3)
        await scene.workers.stop_all()
    finally:
        os.kill(scene.engine.pid, signal.SIGCONT)
    await scene.workers.start()
    healed = time.monotonic()
    await offer(scene.client, scene.task_queue, new_users, delivery=delivery)
    users = [*old_users, *early_users, *new_users]
    accepted = _accepted(users, delivery)
    # Delivered again and waited for, as the load always does: an ignored signal is healed here.
    outcomes = await collect_outcomes(scene.client, scene.task_queue, accepted)
    failed_tasks = 0
    for user in [*old_users[:25], *early_users]:
        history = await scene.client.get_workflow_handle(
            user_workflow_id(user.user_id)
        ).fetch_history()
        failed_tasks += sum(
            1 for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
        )
    if failed_tasks:
        scene.result.problems.append(f"{failed_tasks} workflow task failures (non-determinism?)")
    scene.result.notes.append(
        f"{len(old_users)} syncs started on {PREVIOUS_RELEASE[:8]} and held mid-saga,"
        f" {len(early_users)} sent to it with this release's WaitFor.START;"
        f" {len(new_users)} new ones in a burst on this code;"
        f" {25 + len(early_users)} histories checked"
    )
    await scene.finish(accepted, healed_at=healed, outcomes=outcomes)
    _count_rejections(scene, users, delivery)


# Everything a worker of that release runs: its own shared package, workflows and activities,
# not this checkout's (modules have moved since, and a deployment ships them together).
_RELEASE_PACKAGES = ("spicesync", "workflows", "activities", "workers", "starters")


def _previous_release(directory: Path) -> Path:
    """The Python packages of :data:`PREVIOUS_RELEASE`, extracted from git."""
    target = directory / f"previous-release-{PREVIOUS_RELEASE[:8]}"
    if not all((target / package).is_dir() for package in _RELEASE_PACKAGES):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", PREVIOUS_RELEASE, *_RELEASE_PACKAGES],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


async def _outage(scene: Scene, proxy: FaultProxy, store: str) -> None:
    users = user_batch(scene.task_queue, scene.run.users, org_id=scene.org_id)
    healed: list[float] = []

    async def fault() -> None:
        await proxy.refuse()
        await asyncio.sleep(scene.run.outage_seconds)
        await proxy.restore()
        healed.append(time.monotonic())
        scene.result.notes.append(
            f"{store} refused connections for {scene.run.outage_seconds:g} s;"
            f" {proxy.connections_aborted} open connections reset"
        )

    delivery = await _offer_with_fault(scene, users, len(users) // 3, fault)
    await _finish(scene, users, delivery, healed)


async def _offer_with_fault(
    scene: Scene,
    users: list[CreateUserInput],
    at: int,
    fault: Callable[[], Coroutine[Any, Any, None]],
) -> Delivery:
    """Offer ``users``; start ``fault`` (in the background) once ``at`` are accepted."""
    await scene.workers.start()
    await scene.wait_for_workers()
    running: list[asyncio.Task[None]] = []

    async def accepted_so_far(count: int) -> None:
        if count >= at and not running:
            running.append(asyncio.create_task(fault()))

    delivery = await offer(scene.client, scene.task_queue, users, on_accept=accepted_so_far)
    if running:
        await running[0]
    else:
        scene.result.problems.append("the fault was never injected")
    return delivery


async def _finish(
    scene: Scene,
    users: list[CreateUserInput],
    delivery: Delivery,
    healed: list[float],
    outcomes: dict[str, str] | None = None,
) -> None:
    await scene.finish(_accepted(users, delivery), healed_at=_last(healed), outcomes=outcomes)
    _count_rejections(scene, users, delivery)


def _accepted(users: list[CreateUserInput], delivery: Delivery) -> list[CreateUserInput]:
    return [u for u in users if u.user_id in delivery.accepted]


def _count_rejections(scene: Scene, users: list[CreateUserInput], delivery: Delivery) -> None:
    scene.result.users = len(users)
    scene.result.rejected = len(delivery.rejected)
    if delivery.failed_calls:
        scene.result.problems.append(f"{delivery.failed_calls} events never accepted")
    if delivery.retried_calls:
        scene.result.notes.append(f"{delivery.retried_calls} start calls retried by the app")


def _last(times: list[float]) -> float | None:
    return times[-1] if times else None


SCENARIOS: dict[str, Callable[[Scene], Awaitable[None]]] = {
    "worker_killed_after_pg_commit": worker_killed_after_pg_commit,
    "worker_killed_after_spicedb_ack": worker_killed_after_spicedb_ack,
    "temporal_restarted": temporal_restarted,
    "spicedb_data_lost": spicedb_data_lost,
    "postgres_unreachable": postgres_unreachable,
    "spicedb_unreachable": spicedb_unreachable,
    "wrong_preshared_key": wrong_preshared_key,
    "duplicate_delivery": duplicate_delivery,
    "poison_inputs": poison_inputs,
    "worker_killed_during_compensation": worker_killed_during_compensation,
    "code_change_deployed": code_change_deployed,
    "worker_killed_under_overload": worker_killed_under_overload,
    "relay_killed": relay_killed,
    "nats_relay_killed": nats_relay_killed,
    "cdc_relay_killed": cdc_relay_killed,
}
