"""The invariants, judged from independent reads of PostgreSQL, SpiceDB and Temporal.

Nothing here trusts spicesync's own bookkeeping: the App DB is read with plain SQL, SpiceDB with
``ReadRelationships`` at full consistency, Temporal through its visibility API.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from authzed.api.v1 import Consistency, ReadRelationshipsRequest, RelationshipFilter
from temporalio.client import Client

from chaos.leaks import find_leaks
from spicesync.mapping import MARKER_RELATION, MARKER_TYPE
from spicesync.models import CreateUserInput
from spicesync.spicedb import MANAGED_RELATIONS, SpiceDBClient

__all__ = [
    "ScenarioResult",
    "follow_in_step",
    "held_by_user",
    "judge",
    "judge_follow",
    "judge_leaks",
    "unsettled_workflows",
]

_SETTLED_STAGES = ("idle", "failed", "closed_idle")


@dataclass
class ScenarioResult:
    """One scenario's row in the report."""

    scenario: str
    users: int = 0
    accepted: int = 0
    synced: int = 0
    compensated: int = 0
    rejected: int = 0
    lost: int = 0
    half_written: int = 0
    orphans: int = 0
    duplicates: int = 0
    unsettled: int = 0
    recovery_seconds: float | None = None
    passed: bool = False
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


async def _memberships(spicedb: SpiceDBClient) -> dict[str, list[tuple[str, str]]]:
    """Every user's organization relationships spicesync manages, read fully consistently."""
    held: dict[str, list[tuple[str, str]]] = defaultdict(list)
    stream = spicedb.ReadRelationships(
        ReadRelationshipsRequest(
            consistency=Consistency(fully_consistent=True),
            relationship_filter=RelationshipFilter(resource_type="organization"),
        ),
        timeout=60,
    )
    async for item in stream:
        rel = item.relationship
        if rel.relation in MANAGED_RELATIONS and rel.subject.object.object_type == "user":
            held[rel.subject.object.object_id].append((rel.resource.object_id, rel.relation))
    return held


async def held_by_user(spicedb: SpiceDBClient) -> dict[str, frozenset[tuple[str, str]]]:
    """Every user's managed organization relationships, read fully consistently."""
    return {user: frozenset(grants) for user, grants in (await _memberships(spicedb)).items()}


async def _markers(spicedb: SpiceDBClient) -> dict[str, int]:
    """Every user's marker (``user:<id>#sync_version``): each spicesync write moves it by one."""
    markers: dict[str, int] = {}
    stream = spicedb.ReadRelationships(
        ReadRelationshipsRequest(
            consistency=Consistency(fully_consistent=True),
            relationship_filter=RelationshipFilter(
                resource_type="user", optional_relation=MARKER_RELATION
            ),
        ),
        timeout=60,
    )
    async for item in stream:
        rel = item.relationship
        if rel.subject.object.object_type == MARKER_TYPE:
            markers[rel.resource.object_id] = int(rel.subject.object.object_id)
    return markers


def follow_in_step(
    implied: dict[str, frozenset[tuple[str, str]]], held: dict[str, frozenset[tuple[str, str]]]
) -> bool:
    """Whether SpiceDB holds exactly what each row implies, and nothing for anyone else."""
    return all(held.get(user, frozenset()) == want for user, want in implied.items()) and set(
        held
    ) <= set(implied)


async def judge_follow(
    result: ScenarioResult,
    *,
    spicedb: SpiceDBClient,
    client: Client,
    task_queue: str,
    implied: dict[str, frozenset[tuple[str, str]]],
    real_changes: dict[str, int],
    outbox_rows: int,
    settle_seconds: float = 30.0,
) -> ScenarioResult:
    """Judge a follow-mode scenario: SpiceDB against what every row implies now.

    Args:
        result: The row to fill.
        spicedb: The scenario's SpiceDB (read directly).
        client: Temporal.
        task_queue: The scenario's queue.
        implied: Every user the application ever wrote, with the ``(organization, relation)``
            pairs its row implies now (none for a deleted row), read from the app's table.
        real_changes: Per user, how many committed transactions changed what its row implies.
            spicesync writes only to bring SpiceDB to a state a row implied, so a user's marker
            can never exceed it; more would be a write that no change explains (a duplicate).
        outbox_rows: Rows left in ``spicesync_outbox``; every one must have been delivered.
        settle_seconds: How long visibility may lag behind the workflows' last stage update.
    """
    held = await held_by_user(spicedb)
    markers = await _markers(spicedb)
    for user, want in implied.items():
        got = held.get(user, frozenset())
        if got == want:
            result.synced += 1
        else:
            result.lost += 1
            result.problems.append(
                f"{user}: SpiceDB holds {sorted(got)}, the row implies {sorted(want)}"
            )
        if markers.get(user, 0) > real_changes.get(user, 0):
            result.duplicates += 1
            result.problems.append(
                f"{user}: {markers[user]} writes for {real_changes.get(user, 0)} changes"
            )
    for user, grants in held.items():
        if user not in implied:
            result.orphans += 1
            result.problems.append(f"{user}: relationships {sorted(grants)} of no row written")
    if outbox_rows:
        result.problems.append(f"{outbox_rows} outbox rows never delivered")
    deadline = time.monotonic() + settle_seconds
    unsettled = await unsettled_workflows(client, task_queue, "FollowedUserWorkflow")
    while unsettled and time.monotonic() < deadline:
        await asyncio.sleep(1)
        unsettled = await unsettled_workflows(client, task_queue, "FollowedUserWorkflow")
    result.unsettled = unsettled
    if unsettled:
        result.problems.append(f"{unsettled} followed users' workflows still mid-sync")
    result.users = result.accepted = len(implied)
    result.notes.append(
        f"{sum(markers.get(u, 0) for u in implied)} SpiceDB writes (marker moves) for"
        f" {sum(real_changes.values())} committed changes of what rows imply;"
        f" {sum(1 for want in implied.values() if not want)} users' rows deleted, nothing held"
    )
    result.passed = not (
        result.lost or result.orphans or result.duplicates or result.unsettled or result.problems
    )
    return result


async def unsettled_workflows(
    client: Client, task_queue: str, workflow_type: str = "UserSyncWorkflow"
) -> int:
    """Running user syncs on ``task_queue`` with an event still in flight (visibility API).

    Args:
        client: Temporal.
        task_queue: The scenario's queue.
        workflow_type: Owned mode's per-user workflow, or follow mode's
            (``FollowedUserWorkflow``, whose stages have the same names).
    """
    stages = ", ".join(f"'{s}'" for s in _SETTLED_STAGES)
    query = (
        f"TaskQueue = '{task_queue}' AND ExecutionStatus = 'Running'"
        f" AND WorkflowType = '{workflow_type}' AND SpicesyncStage NOT IN ({stages})"
    )
    return (await client.count_workflows(query)).count


async def judge(
    result: ScenarioResult,
    *,
    pool: asyncpg.Pool,
    spicedb: SpiceDBClient,
    client: Client,
    task_queue: str,
    accepted: list[CreateUserInput],
    outcomes: dict[str, str],
    expect_failed: dict[str, str] | None = None,
    unaccepted: list[CreateUserInput] | None = None,
    settle_seconds: float = 30.0,
) -> ScenarioResult:
    """Fill ``result`` from the stores' own state and decide whether the scenario passed.

    Args:
        result: The row to fill.
        pool: The scenario's App DB (read directly, not through any proxy).
        spicedb: The scenario's SpiceDB (read directly).
        client: Temporal.
        task_queue: The scenario's queue.
        accepted: Every user whose event was accepted.
        outcomes: Each accepted user's final outcome (see :func:`chaos.load.collect_outcomes`).
        expect_failed: Users that must end failed, with the error type they must fail with.
        unaccepted: Users offered whose call the app gave up on: each must end synced (the
            event was accepted after all) or with nothing in either store, never in between.
        settle_seconds: How long visibility may lag behind the workflows' last stage update.
    """
    expect_failed = expect_failed or {}
    rows = {
        str(r["id"]): r
        for r in await pool.fetch("SELECT id, org_id, role, sync_status, zed_token FROM users")
    }
    held = await _memberships(spicedb)
    known = {u.user_id for u in accepted}
    for user in accepted:
        row, grants = rows.get(user.user_id), held.get(user.user_id, [])
        outcome = outcomes.get(user.user_id, "unfinished")
        synced = _count_state(result, user, row, grants, f"outcome={outcome}")
        neither = row is None and not grants
        if outcome == "unfinished" or (outcome == "synced" and not synced):
            result.lost += 1
            result.problems.append(f"{user.user_id}: outcome {outcome}, synced={synced}")
        elif outcome.startswith("failed:") and not neither:
            result.problems.append(f"{user.user_id}: {outcome} but not rolled back")
        wanted = expect_failed.get(user.user_id)
        if wanted is not None and outcome != f"failed:{wanted}":
            result.problems.append(f"{user.user_id}: expected failed:{wanted}, got {outcome}")
        if wanted is None and outcome != "synced":
            result.problems.append(f"{user.user_id}: expected synced, got {outcome}")
    for user_id, grants in held.items():
        if len(grants) > 1:
            result.duplicates += 1
            result.problems.append(f"{user_id}: {len(grants)} memberships {grants}")
        row = rows.get(user_id)
        if row is None or row["sync_status"] != "synced":
            result.orphans += 1
            if user_id not in known:
                result.problems.append(f"{user_id}: relationship of a user never accepted")
    duplicate_emails = await pool.fetchval(
        "SELECT count(*) FROM (SELECT lower(email) FROM users GROUP BY 1 HAVING count(*) > 1) d"
    )
    result.duplicates += int(duplicate_emails)
    for user in unaccepted or []:
        known.add(user.user_id)
        _count_state(
            result, user, rows.get(user.user_id), held.get(user.user_id, []), "call given up"
        )
    strays = set(rows) - known
    if strays:
        result.half_written += len(strays)
        result.problems.append(f"{len(strays)} rows of users never accepted")
    # Visibility lags behind the workflows' last stage update by up to a few seconds.
    deadline = time.monotonic() + settle_seconds
    unsettled = await unsettled_workflows(client, task_queue)
    while unsettled and time.monotonic() < deadline:
        await asyncio.sleep(1)
        unsettled = await unsettled_workflows(client, task_queue)
    result.unsettled = unsettled
    if unsettled:
        result.problems.append(f"{unsettled} workflows still have an event in flight")
    result.accepted = len(accepted)
    result.passed = not (
        result.lost
        or result.half_written
        or result.orphans
        or result.duplicates
        or result.unsettled
        or result.problems
    )
    return result


def _count_state(
    result: ScenarioResult,
    user: CreateUserInput,
    row: asyncpg.Record | None,
    grants: list[tuple[str, str]],
    note: str,
) -> bool:
    """Count ``user`` as synced, as in neither store, or as half-written; True if synced."""
    synced = (
        row is not None
        and row["sync_status"] == "synced"
        and (row["org_id"], row["role"]) == (user.org_id, user.role)
        and grants == [(user.org_id, user.role)]
    )
    if synced:
        result.synced += 1
    elif row is None and not grants:
        result.compensated += 1
    else:
        result.half_written += 1
        result.problems.append(
            f"{user.user_id}: row={None if row is None else row['sync_status']}"
            f" grants={grants} {note}"
        )
    return synced


def judge_leaks(
    result: ScenarioResult, *, spans: Path, logs: list[Path], users: Iterable[CreateUserInput]
) -> ScenarioResult:
    """Look for every user's email and name in what the workers exported and printed.

    Read after the workers stopped gracefully (a worker flushes its spans as it stops). A
    leak is a problem and fails the scenario; so does a trace file without spans, since a scan
    of nothing proves nothing.

    Args:
        result: The row to fill.
        spans: The workers' trace file (JSON lines).
        logs: The workers' logs.
        users: Whose emails and names must appear nowhere, accepted or refused.
    """
    exported = spans.read_text(errors="replace") if spans.is_file() else ""
    span_count = sum(1 for line in exported.splitlines() if line.strip())
    if not span_count:
        result.problems.append(f"no spans in {spans.name} to scan for emails and names")
    printed = {log.name: log.read_text(errors="replace") for log in logs if log.is_file()}
    log_lines = sum(len(text.splitlines()) for text in printed.values())
    users = list(users)
    leaks = find_leaks({spans.name: exported, **printed}, users)
    for leak in leaks[:20]:
        result.problems.append(f"{leak.user_id}: its {leak.field} is in {leak.where}")
    if len(leaks) > 20:
        result.problems.append(f"{len(leaks)} emails or names found in spans or logs in all")
    result.notes.append(
        f"{span_count} spans and {log_lines} log lines scanned for the emails and names of"
        f" {len(users)} users: {len(leaks)} found"
    )
    result.passed = result.passed and not result.problems
    return result
