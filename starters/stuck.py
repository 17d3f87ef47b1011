"""Find stuck syncs with Temporal's own visibility and describe APIs (``spicesync stuck``).

A sync is stuck when its user's workflow has been in an active stage (working on PostgreSQL or
SpiceDB) for longer than a threshold: typically an activity retrying through an outage, which
Temporal shows only as "Running". Nothing here keeps state of its own; it asks Temporal, and,
for creations that never finished, the App DB: a row spicesync inserted that is still pending
after the threshold while no sync of its user is in an active stage has nothing in flight that
will finish it (``spicesync reconcile --apply`` removes it).
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import asyncpg
from pydantic import BaseModel
from temporalio.client import Client

from spicesync.constants import (
    ACTIVE_STAGES,
    FOLLOWED_USER_WORKFLOW,
    USER_SYNC_WORKFLOW,
    followed_user_workflow_id,
    user_workflow_id,
)
from spicesync.temporal import sync_is_active

__all__ = [
    "FAILED_FOLLOWED_STAGE",
    "UNFINISHED_STAGE",
    "StuckSync",
    "find_failed_followed",
    "find_stuck",
    "find_unfinished",
    "parse_duration",
    "stuck_query",
]

# The stage ``spicesync stuck`` shows for a creation's pending row that nothing will finish.
UNFINISHED_STAGE = "unfinished_creation"

_UNFINISHED = """
SELECT id, created_at FROM users
WHERE sync_status = 'pending' AND created_by_event IS NOT NULL AND created_at < $1
ORDER BY created_at
LIMIT $2
"""

# The stage ``spicesync stuck`` shows for a followed user whose last sync failed for good.
FAILED_FOLLOWED_STAGE = "failed"

_FAILED_FOLLOWED = """
SELECT user_id, last_error, failed_at FROM spicesync_followed_users
WHERE status = 'failed' AND failed_at < $1
ORDER BY failed_at
LIMIT $2
"""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class StuckSync(BaseModel):
    """One stuck sync (opaque ids only)."""

    user_id: str
    workflow_id: str
    stage: str
    since: datetime
    age_seconds: float
    activity: str | None
    attempt: int
    last_error: str | None


def parse_duration(text: str) -> timedelta:
    """Parse ``30s``, ``5m``, ``2h`` or ``1d``.

    Raises:
        ValueError: On anything else.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 2h)")
    return timedelta(seconds=float(match[1]) * _UNIT[match[2]])


def stuck_query(cutoff: datetime) -> str:
    """The visibility query (also usable as a saved view in the Temporal UI)."""
    stages = ", ".join(f"'{stage}'" for stage in ACTIVE_STAGES)
    moment = cutoff.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return (
        f"WorkflowType IN ('{USER_SYNC_WORKFLOW}', '{FOLLOWED_USER_WORKFLOW}')"
        " AND ExecutionStatus = 'Running'"
        f" AND SpicesyncStage IN ({stages}) AND SpicesyncStageSince < '{moment}'"
    )


async def find_stuck(client: Client, *, older_than: timedelta) -> list[StuckSync]:
    """List syncs that have been in an active stage for longer than ``older_than``.

    Args:
        client: A client with spicesync's data converter (to decode failure messages).
        older_than: The threshold.

    Returns:
        The stuck syncs, longest-stuck first.
    """
    now = datetime.now(UTC)
    found: list[StuckSync] = []
    async for execution in client.list_workflows(stuck_query(now - older_than)):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        description = await handle.describe()
        attributes = {k.name: v for k, v in description.typed_search_attributes}
        since = attributes.get("SpicesyncStageSince")
        if not isinstance(since, datetime):
            continue
        pending = list(description.raw_description.pending_activities)
        busiest = max(pending, key=lambda p: p.attempt, default=None)
        last_error = None
        if busiest is not None and busiest.HasField("last_failure"):
            decoded = await client.data_converter.decode_failure(busiest.last_failure)
            last_error = str(decoded)
        found.append(
            StuckSync(
                user_id=str(attributes.get("SpicesyncUserId", "")),
                workflow_id=execution.id,
                stage=str(attributes.get("SpicesyncStage", "")),
                since=since,
                age_seconds=(now - since).total_seconds(),
                activity=busiest.activity_type.name if busiest is not None else None,
                attempt=busiest.attempt if busiest is not None else 0,
                last_error=last_error,
            )
        )
    return sorted(found, key=lambda s: s.since)


async def find_unfinished(
    client: Client, pool: asyncpg.Pool, *, older_than: timedelta, limit: int = 1000
) -> list[StuckSync]:
    """List creations whose row has been pending for longer than ``older_than`` with no sync.

    Such a row was inserted for an event that Temporal never accepted (by code before the
    event's acceptance had to be durable first) or whose sync an operator terminated; a sync
    still working on it (an outage, a schema mismatch) is listed by :func:`find_stuck` instead.

    Args:
        client: A Temporal client.
        pool: The App DB.
        older_than: The threshold.
        limit: At most this many rows are looked at.

    Returns:
        The unfinished creations, oldest first.
    """
    now = datetime.now(UTC)
    rows = await pool.fetch(_UNFINISHED, now - older_than, limit)
    active = await asyncio.gather(*(sync_is_active(client, r["id"]) for r in rows))
    return [
        StuckSync(
            user_id=str(r["id"]),
            workflow_id=user_workflow_id(r["id"]),
            stage=UNFINISHED_STAGE,
            since=r["created_at"],
            age_seconds=(now - r["created_at"]).total_seconds(),
            activity=None,
            attempt=0,
            last_error="pending row, no sync in flight: `spicesync reconcile --apply` removes it",
        )
        for r, is_active in zip(rows, active, strict=True)
        if not is_active
    ]


async def find_failed_followed(
    pool: asyncpg.Pool, *, older_than: timedelta, limit: int = 1000
) -> list[StuckSync]:
    """List followed users (follow mode) whose last sync failed for good, per the bookkeeping.

    Such a user stays as it is until the application changes its row again (the next change
    retries) or a repair delivers a change; the application's table is never touched.

    Args:
        pool: The App DB (``spicesync_followed_users`` exists in both modes).
        older_than: Failed at least this long ago.
        limit: At most this many users.

    Returns:
        The failed users (opaque id, error type, since), oldest failure first.
    """
    now = datetime.now(UTC)
    rows = await pool.fetch(_FAILED_FOLLOWED, now - older_than, limit)
    return [
        StuckSync(
            user_id=r["user_id"],
            workflow_id=followed_user_workflow_id(r["user_id"]),
            stage=FAILED_FOLLOWED_STAGE,
            since=r["failed_at"],
            age_seconds=(now - r["failed_at"]).total_seconds(),
            activity=None,
            attempt=0,
            last_error=r["last_error"],
        )
        for r in rows
    ]
