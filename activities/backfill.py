"""The backfill's step: bring one keyset batch of never-synced App DB users into SpiceDB.

Users that existed before spicesync was installed have a row but no relationships. A batch is
written as one WriteRelationships of TOUCHes (one membership per user): measured on the engine
here, batched TOUCHes are 50-100 times faster than per-user preconditions, and SpiceDB's bulk
import can neither skip what exists nor be made safe beside live syncs.

Safety beside live syncs comes from the row lock: the batch's rows are locked (in id order)
before the write and re-checked under the lock, and a live sync takes the same row's lock around
its own SpiceDB write and marks the row as written. So a user is either written by the backfill
first or skipped because a live sync got there first; an older membership never lands over a
newer one. A live sync of this release reads SpiceDB under that lock before it writes, so it
finds what the backfill wrote and plans from it. A sync begun by an earlier release read SpiceDB
before taking the lock and relies on the user's version marker moving instead: while such a
sync may run (``count_unchecked_syncs``), the backfill writes each user's marker too, two
relationships per user instead of one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import grpc.aio
from authzed.api.v1 import RelationshipUpdate, WriteRelationshipsRequest
from google.protobuf.struct_pb2 import Struct
from temporalio import activity
from temporalio.client import Client

from spicesync.errors import (
    AppDBUnavailable,
    FailureKind,
    SpiceDBRejected,
    SpiceDBUnavailable,
    classify_grpc_status,
)
from spicesync.models import (
    BackfillPageInput,
    BackfillPageResult,
    CountBackfillInput,
    CountUncheckedSyncsInput,
    Membership,
)
from spicesync.spicedb import SpiceDBClient, marker_relationship, membership_relationship

__all__ = ["MARKED_BATCH_MAX", "YOUNG_RUN_GRACE", "BackfillActivities"]

# Users in a batch that writes version markers too: two updates a user, and SpiceDB accepts at
# most 1,000 updates per write by default (BACKFILL_BATCH_SIZE_MAX: one update a user).
MARKED_BATCH_MAX = 500

# How long a run of this release may take to record its release marker (its first workflow task).
YOUNG_RUN_GRACE = timedelta(seconds=60)

_NEVER_WRITTEN = "permissions_written_at IS NULL AND created_by_event IS NULL"
_COUNT = f"SELECT count(*) FROM users WHERE {_NEVER_WRITTEN}"
_PAGE = f"""
SELECT id FROM users
WHERE {_NEVER_WRITTEN} AND ($1::uuid IS NULL OR id > $1) AND ($3::uuid IS NULL OR id < $3)
ORDER BY id LIMIT $2
"""
# Re-checked under the lock: a live sync that wrote meanwhile has set permissions_written_at.
_LOCK = f"""
SELECT id, org_id, role, version FROM users
WHERE id = ANY($1::uuid[]) AND {_NEVER_WRITTEN}
ORDER BY id
FOR UPDATE
"""
_MARK = """
UPDATE users
SET permissions_written_at = now(), sync_status = 'synced', synced_at = now(), zed_token = $2
WHERE id = ANY($1::uuid[])
"""
_TOUCH = RelationshipUpdate.Operation.OPERATION_TOUCH
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class BackfillActivities:
    """The backfill's activities, sharing the worker's pool and SpiceDB client."""

    def __init__(self, pool: asyncpg.Pool, spicedb: SpiceDBClient, client: Client) -> None:
        self._pool = pool
        self._spicedb = spicedb
        self._client = client

    @activity.defn
    async def count_unchecked_syncs(self, request: CountUncheckedSyncsInput) -> int:
        """How many running user syncs on the queue may write without checking SpiceDB first.

        Those are runs whose ``TemporalChangeVersion`` holds none of ``checked_markers``: begun
        by a release before the checked write (an idle one switches at its next event, but the
        count cannot tell it from one mid-write). Runs begun in the last
        :data:`YOUNG_RUN_GRACE` are not counted: once every worker runs this release (the
        backfill's precondition, docs/reconcile-and-backfill.md) they are this release's runs
        whose first workflow task has not recorded its marker yet, and counting them would keep
        the markers whenever users sign up.

        Raises:
            Exception: Temporal's visibility failed; retried.
        """
        started_before = datetime.now(UTC) - YOUNG_RUN_GRACE
        running = (
            f"WorkflowType = 'UserSyncWorkflow' AND ExecutionStatus = 'Running'"
            f" AND TaskQueue = '{_quoted(request.task_queue)}'"
            f" AND StartTime < '{started_before.isoformat().replace('+00:00', 'Z')}'"
        )
        checked = ", ".join(f"'{_quoted(m)}'" for m in sorted(request.checked_markers))
        total = (await self._client.count_workflows(running)).count
        if not total or not checked:
            return total
        ahead = await self._client.count_workflows(
            f"{running} AND TemporalChangeVersion IN ({checked})"
        )
        return max(total - ahead.count, 0)

    @activity.defn
    async def count_backfill_candidates(self, _request: CountBackfillInput) -> int:
        """How many users spicesync has never written to SpiceDB (for the progress bar).

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
        """
        try:
            return int(await self._pool.fetchval(_COUNT))
        except _DB_ERRORS as err:
            raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None

    @activity.defn
    async def backfill_batch(self, request: BackfillPageInput) -> BackfillPageResult:
        """Write one batch: lock, re-check, one atomic TOUCH write, mark the rows written.

        Idempotent: TOUCH rewrites the same relationships, and a retried batch finds the rows
        it already marked gone from the candidates.

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
            SpiceDBUnavailable: SpiceDB failed transiently; retried.
            SpiceDBRejected: SpiceDB refused the write for good (a schema without spicesync's
                relations, say).
        """
        after = uuid.UUID(request.after_user_id) if request.after_user_id else None
        before = uuid.UUID(request.before_user_id) if request.before_user_id else None
        size = (
            min(request.batch_size, MARKED_BATCH_MAX)
            if request.version_markers
            else request.batch_size
        )
        try:
            async with self._pool.acquire() as conn:
                # One id beyond the page says whether another page follows, so the last page
                # ends the lane instead of an empty batch after it (one round trip per lane).
                page = [r["id"] for r in await conn.fetch(_PAGE, after, size + 1, before)]
                ids = page[:size]
                async with conn.transaction():
                    rows = await conn.fetch(_LOCK, ids)
                    token = None
                    if rows:
                        token = await self._write(rows, request.request_id, request.version_markers)
                        await conn.execute(_MARK, [r["id"] for r in rows], token)
        except _DB_ERRORS as err:
            raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None
        return BackfillPageResult(
            scanned=len(ids),
            written_users=len(rows),
            skipped=len(ids) - len(rows),
            relationships_written=(2 if request.version_markers else 1) * len(rows),
            zed_token=token,
            next=str(ids[-1]) if len(page) > size else None,
        )

    async def _write(self, rows: list[asyncpg.Record], request_id: str, markers: bool) -> str:
        updates: list[RelationshipUpdate] = []
        for row in rows:
            user_id = str(row["id"])
            membership = Membership(user_id=user_id, org_id=row["org_id"], role=row["role"])
            updates.append(
                RelationshipUpdate(
                    operation=_TOUCH, relationship=membership_relationship(membership)
                )
            )
            if markers:
                updates.append(
                    RelationshipUpdate(
                        operation=_TOUCH, relationship=marker_relationship(user_id, row["version"])
                    )
                )
        tag = Struct()
        tag.update({"backfill": request_id})
        try:
            response = await self._spicedb.WriteRelationships(
                WriteRelationshipsRequest(updates=updates, optional_transaction_metadata=tag),
                timeout=30,
            )
        except grpc.aio.AioRpcError as err:
            text = f"SpiceDB {err.code().name} writing a backfill batch: {err.details()}"
            if classify_grpc_status(err.code()) is FailureKind.PERMANENT:
                raise SpiceDBRejected(text) from None
            raise SpiceDBUnavailable(text) from None
        return str(response.written_at.token)


def _quoted(value: str) -> str:
    """``value`` inside a single-quoted visibility query literal."""
    return value.replace("\\", "\\\\").replace("'", "\\'")
