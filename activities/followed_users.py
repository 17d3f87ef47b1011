"""Follow mode's activities: bring SpiceDB in step with one user's row as it is now.

A sync is level-triggered: it does not ask what changed. It reads the mapped columns of the
user's row (none: the row is gone), computes the managed relationships the mapping implies,
reads the managed relationships SpiceDB holds (and the user's marker), and writes the
difference in one atomic WriteRelationships under a precondition on the marker it read. So a
duplicate, late or out-of-order change is harmless: every sync converges on the row's latest
state, and a sync that finds nothing to change writes nothing at all.

spicesync never writes the application's table; what it applied is recorded in its own
``spicesync_followed_users``.
"""

from __future__ import annotations

import asyncpg
import grpc
import grpc.aio
from authzed.api.v1 import (
    Precondition,
    RelationshipUpdate,
    WriteRelationshipsRequest,
)
from google.protobuf.struct_pb2 import Struct
from temporalio import activity

from spicesync.app_table import AppTable
from spicesync.constants import SPICEDB_CALL_TIMEOUT_SECONDS
from spicesync.errors import (
    AppDBRejected,
    AppDBUnavailable,
    FailureKind,
    MarkerChanged,
    RowUnmappable,
    classify_sqlstate,
)
from spicesync.mapping import Tuple, UnmappableRow
from spicesync.models import (
    RecordFollowFailureInput,
    SyncFollowedUserInput,
    SyncFollowedUserResult,
)
from spicesync.spicedb import (
    ManagedState,
    SpiceDBClient,
    failed_precondition,
    marker_filter,
    marker_relationship,
    read_managed,
    revision_now,
    spicedb_failure,
    tuple_relationship,
)

__all__ = ["FollowedUserActivities"]

_TOUCH = RelationshipUpdate.Operation.OPERATION_TOUCH
_DELETE = RelationshipUpdate.Operation.OPERATION_DELETE
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# Guarded: an attempt that read an older marker (one that timed out and woke up late) never
# overwrites what a newer sync recorded.
_RECORD_SYNC = """
INSERT INTO spicesync_followed_users AS f
    (user_id, status, applied_version, applied_position, marker, zed_token, relationships,
     synced_at, updated_at)
VALUES ($1, 'synced', $2, $3, $4, $5, $6, now(), now())
ON CONFLICT (user_id) DO UPDATE SET
    status = 'synced', applied_version = EXCLUDED.applied_version,
    applied_position = COALESCE(EXCLUDED.applied_position, f.applied_position),
    marker = EXCLUDED.marker, zed_token = EXCLUDED.zed_token,
    relationships = EXCLUDED.relationships, last_error = NULL, error_message = NULL,
    failed_at = NULL, synced_at = now(), updated_at = now()
WHERE COALESCE(f.marker, 0) <= COALESCE(EXCLUDED.marker, 0)
"""
_RECORD_FAILURE = """
INSERT INTO spicesync_followed_users AS f
    (user_id, status, last_error, error_message, failed_at, updated_at)
VALUES ($1, 'failed', $2, $3, now(), now())
ON CONFLICT (user_id) DO UPDATE SET
    status = 'failed', last_error = EXCLUDED.last_error, error_message = EXCLUDED.error_message,
    failed_at = now(), updated_at = now()
"""


def _app_db_failure(err: BaseException, user_id: str) -> Exception:
    # Re-raised "from None" by the callers: PostgreSQL's DETAIL may quote the row's values.
    sqlstate = getattr(err, "sqlstate", None)
    if classify_sqlstate(sqlstate) is FailureKind.PERMANENT:
        return AppDBRejected(f"user {user_id}: PostgreSQL rejected the statement ({sqlstate})")
    return AppDBUnavailable(f"user {user_id}: PostgreSQL unavailable: {type(err).__name__}")


def _written_by(sync_id: str) -> Struct:
    """Tag a write with the workflow run and sync that made it, so Watch and audits can tell."""
    info = activity.info()
    tag = Struct()
    tag.update(
        {"workflow_id": info.workflow_id, "run_id": info.workflow_run_id, "sync_id": sync_id}
    )
    return tag


class FollowedUserActivities:
    """Follow mode's activities, sharing the worker's pool, SpiceDB client and mapping."""

    def __init__(self, pool: asyncpg.Pool, client: SpiceDBClient, table: AppTable) -> None:
        self._pool = pool
        self._client = client
        self._table = table
        self._mapping = table.mapping

    @activity.defn
    async def sync_followed_user(self, request: SyncFollowedUserInput) -> SyncFollowedUserResult:
        """Make the user's managed relationships in SpiceDB match the row as it is now.

        Returns:
            What the sync did (``unchanged``: nothing differed, nothing was written), with a
            ZedToken at least as fresh as the state it leaves: the write's ``written_at``, or
            the read's revision when nothing was written.

        Raises:
            RowUnmappable: The row gives an invalid object id or relation; nothing written.
            SchemaMismatch: SpiceDB's schema lacks a managed relation (the sync parks).
            SpiceDBRejected: Another permanent refusal (e.g. INVALID_ARGUMENT).
            MarkerChanged: The marker moved since the read; retried (the retry reads again).
            SpiceDBUnavailable, AppDBUnavailable: Transient; retried.
        """
        user_id = request.user_id
        mapping = self._mapping
        try:
            records = await self._pool.fetch(
                self._table.select, self._table.id_value(user_id), user_id
            )
        except _DB_ERRORS as err:
            raise _app_db_failure(err, user_id) from None
        if len(records) > 1:
            raise RowUnmappable(
                f"user {user_id}: {mapping.source.table} has more than one row with this"
                f" {mapping.source.id}"
            )
        recorded_marker = records[0][0]
        row = self._table.row(user_id, records[0])
        try:
            target = mapping.relationships(user_id, row)
        except UnmappableRow as err:
            raise RowUnmappable(f"user {user_id}: {err}") from None
        version = (
            row[mapping.source.version] if row is not None and mapping.source.version else None
        )
        try:
            held = await read_managed(
                self._client,
                user_id=user_id,
                subject_type=mapping.subject_type,
                managed=mapping.managed,
            )
            remove, add = held.relationships - target, target - held.relationships
            marker = held.marker
            if not remove and not add:
                # SpiceDB's marker ahead of the bookkeeping: an earlier attempt of a sync (a
                # local try that timed out after its write, say) wrote and was not recorded.
                # Its write made SpiceDB match the row, so the caller hears "synced".
                wrote_unrecorded = (held.marker or 0) > (recorded_marker or 0)
                status = "synced" if wrote_unrecorded else "unchanged"
                token = held.read_at or await revision_now(
                    self._client, user_id=user_id, subject_type=mapping.subject_type
                )
            else:
                status = "synced"
                # Above both SpiceDB's marker and the bookkeeping's: monotone even after
                # SpiceDB lost its data.
                marker = max(held.marker or 0, recorded_marker or 0) + 1
                token = await self._write(request, held, sorted(remove), sorted(add), marker)
        except grpc.aio.AioRpcError as err:
            if failed_precondition(err):
                raise MarkerChanged(
                    f"user {user_id}: the marker moved since the read; nothing was written"
                ) from None
            raise spicedb_failure(err, user_id) from None
        try:
            await self._pool.execute(
                _RECORD_SYNC, user_id, version, request.position, marker, token, len(target)
            )
        except _DB_ERRORS as err:
            raise _app_db_failure(err, user_id) from None
        return SyncFollowedUserResult(
            status=status,
            row_exists=row is not None,
            version=version,
            added=len(add),
            removed=len(remove),
            marker=marker,
            zed_token=token,
        )

    async def _write(
        self,
        request: SyncFollowedUserInput,
        held: ManagedState,
        remove: list[Tuple],
        add: list[Tuple],
        marker: int,
    ) -> str:
        """One atomic write: the difference, and the marker moved, if it is still as read."""
        user_id, subject_type = request.user_id, self._mapping.subject_type
        updates = [
            RelationshipUpdate(operation=_DELETE, relationship=tuple_relationship(t))
            for t in remove
        ] + [RelationshipUpdate(operation=_TOUCH, relationship=tuple_relationship(t)) for t in add]
        updates += [
            RelationshipUpdate(
                operation=_DELETE,
                relationship=marker_relationship(user_id, old, subject_type=subject_type),
            )
            for old in held.markers
        ]
        updates.append(
            RelationshipUpdate(
                operation=_TOUCH,
                relationship=marker_relationship(user_id, marker, subject_type=subject_type),
            )
        )
        precondition = (
            Precondition(
                operation=Precondition.Operation.OPERATION_MUST_NOT_MATCH,
                filter=marker_filter(user_id, None, subject_type=subject_type),
            )
            if held.marker is None
            else Precondition(
                operation=Precondition.Operation.OPERATION_MUST_MATCH,
                filter=marker_filter(user_id, held.marker, subject_type=subject_type),
            )
        )
        response = await self._client.WriteRelationships(
            WriteRelationshipsRequest(
                updates=updates,
                optional_preconditions=[precondition],
                optional_transaction_metadata=_written_by(request.sync_id),
            ),
            timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
        )
        return str(response.written_at.token)

    @activity.defn
    async def record_follow_failure(self, request: RecordFollowFailureInput) -> None:
        """Record that the user's sync failed for good (``spicesync stuck`` lists it).

        The application's table is left as it is; the user's next change tries again.

        Raises:
            AppDBUnavailable: Transient; retried.
        """
        try:
            await self._pool.execute(
                _RECORD_FAILURE, request.user_id, request.error_type, request.message
            )
        except _DB_ERRORS as err:
            raise _app_db_failure(err, request.user_id) from None
