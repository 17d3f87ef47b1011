"""Find stuck syncs with Temporal's own visibility and describe APIs (``spicesync stuck``).

A sync is stuck when its user's workflow has been in an active stage (working on PostgreSQL or
SpiceDB) for longer than a threshold: typically an activity retrying through an outage, which
Temporal shows only as "Running". Nothing here keeps state of its own; it asks Temporal.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel
from temporalio.client import Client

from spicesync.constants import ACTIVE_STAGES

__all__ = ["StuckSync", "find_stuck", "parse_duration", "stuck_query"]

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
        "WorkflowType = 'UserSyncWorkflow' AND ExecutionStatus = 'Running'"
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
