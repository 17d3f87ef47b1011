"""SpiceDB steps of the saga: read a user's memberships, and rewrite them in one atomic call.

Every write moves the user's version marker (``user:<id>#sync_version@spicesync_version:<v>``)
under a precondition on the marker it expects, so writes are compare-and-set: a write from an
attempt that was given up on can never land after a newer one. An event's write runs inside a
PostgreSQL transaction on the user's row: it claims the row (the lock a backfill shares), checks
that SpiceDB holds the state the workflow predicted (``only_if``), brings the row to the event
(``record``), writes SpiceDB, stores the ZedToken, and commits; so a failure before the commit
leaves the row as it was, and a retry recognises a SpiceDB write that landed by its marker.
"""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import grpc.aio
from authzed.api.v1 import (
    Precondition,
    RelationshipFilter,
    RelationshipUpdate,
    SubjectFilter,
    WriteRelationshipsRequest,
)
from google.protobuf.struct_pb2 import Struct
from temporalio import activity

from activities.user_rows import Connection, record_event, record_zed_token, recorded_already
from spicesync.constants import SPICEDB_CALL_TIMEOUT_SECONDS
from spicesync.errors import (
    AppDBRejected,
    AppDBRejectedAfterWrite,
    AppDBUnavailable,
    FailureKind,
    MarkerMoved,
    SupersededWrite,
    UserRowMissing,
    classify_sqlstate,
)
from spicesync.models import (
    MembershipsSnapshot,
    ReadMembershipsInput,
    WriteMembershipsInput,
    WriteMembershipsResult,
)
from spicesync.spicedb import (
    MANAGED_RELATIONS,
    SpiceDBClient,
    failed_precondition,
    marker_filter,
    marker_relationship,
    membership_relationship,
    read_user_snapshot,
    spicedb_failure,
)

__all__ = ["MembershipActivities"]

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

_TOUCH = RelationshipUpdate.Operation.OPERATION_TOUCH
_DELETE = RelationshipUpdate.Operation.OPERATION_DELETE
# The mapping onto typed errors is shared with follow mode (spicesync/spicedb.py).
_translate = spicedb_failure


def _written_by(event_id: str) -> Struct:
    """Tag a write with the workflow and event that made it, so Watch and audits can tell."""
    info = activity.info()
    tag = Struct()
    tag.update(
        {
            "workflow_id": info.workflow_id,
            "run_id": info.workflow_run_id,
            "event_id": event_id,
        }
    )
    return tag


# Taken around every write: the row's lock is the one per-user mutex a backfill shares with the
# live syncs, and the timestamp tells a backfill that this user's relationships are spicesync's.
_CLAIM_ROW = "UPDATE users SET permissions_written_at = now() WHERE id = $1"


class MembershipActivities:
    """Activities on SpiceDB relationships, sharing the worker's one SpiceDB client and pool."""

    def __init__(self, client: SpiceDBClient, pool: asyncpg.Pool) -> None:
        self._client = client
        self._pool = pool

    async def _read(self, user_id: str) -> MembershipsSnapshot:
        return await read_user_snapshot(self._client, user_id)

    @activity.defn
    async def read_memberships(self, request: ReadMembershipsInput) -> MembershipsSnapshot:
        """Read the user's memberships and version marker, fully consistently.

        The workflow keeps this snapshot in its history as the prior state that compensation
        restores exactly.

        Raises:
            SpiceDBRejected: A permanent refusal.
            SpiceDBUnavailable: A transient failure; retried.
        """
        try:
            return await self._read(request.user_id)
        except grpc.aio.AioRpcError as err:
            raise _translate(err, request.user_id) from None

    @activity.defn
    async def write_memberships(self, request: WriteMembershipsInput) -> WriteMembershipsResult:
        """Remove and add memberships and move the version marker, in one atomic write.

        With ``only_if`` set, the write goes through only if the user's memberships and marker
        are exactly ``only_if`` (checked under the row's lock, after the claim), so the state a
        rollback restores is the one the workflow already holds. An ``only_if`` of nothing is
        checked by the write's own preconditions; any other is read first.

        Returns:
            SpiceDB's ``written_at`` ZedToken; or, when SpiceDB did not hold ``only_if``, what
            it holds (``found``), with nothing written.

        Raises:
            SupersededWrite: The marker is neither the expected one nor this write's own (a newer
                sync has applied since this write was planned); nothing was written.
            SpiceDBRejected: INVALID_ARGUMENT, FAILED_PRECONDITION (schema), UNAUTHENTICATED, ...
            SpiceDBUnavailable: UNAVAILABLE, DEADLINE_EXCEEDED, ...; retried.
        """
        uid = request.user_id
        updates = [
            RelationshipUpdate(operation=_DELETE, relationship=membership_relationship(m))
            for m in request.remove
        ] + [
            RelationshipUpdate(operation=_TOUCH, relationship=membership_relationship(m))
            for m in request.add
        ]
        if request.remove_marker is not None and request.remove_marker != request.set_marker:
            updates.append(
                RelationshipUpdate(
                    operation=_DELETE, relationship=marker_relationship(uid, request.remove_marker)
                )
            )
        if request.set_marker is not None:
            updates.append(
                RelationshipUpdate(
                    operation=_TOUCH, relationship=marker_relationship(uid, request.set_marker)
                )
            )
        preconditions = []
        if request.check_marker:
            preconditions.append(
                Precondition(
                    operation=Precondition.Operation.OPERATION_MUST_NOT_MATCH,
                    filter=marker_filter(uid, None),
                )
                if request.expected_marker is None
                else Precondition(
                    operation=Precondition.Operation.OPERATION_MUST_MATCH,
                    filter=marker_filter(uid, request.expected_marker),
                )
            )
        write = WriteRelationshipsRequest(
            updates=updates,
            optional_preconditions=preconditions,
            optional_transaction_metadata=_written_by(request.event_id),
        )
        spicedb_called = False
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(_CLAIM_ROW, uuid.UUID(uid))
                absent = _absent(request)
                if absent:
                    # Only_if says SpiceDB holds nothing of the user (a new user, most often):
                    # the preconditions check that within the write, with no read before it.
                    written = await self._write_if_absent(conn, request, write, absent)
                    if written is not None:
                        spicedb_called = True  # the commit, still to come, follows the write
                        return written
                if request.only_if is not None:
                    current = await self._read(uid)
                    if not _holds(current, request.only_if):
                        if _holds(current, _intended(request)):
                            # This write wrote only after finding ``only_if``: an earlier
                            # attempt of it landed (its marker and exactly its memberships),
                            # and this is its retry. Anything else, even under this write's
                            # marker (a backfill that wrote after the attempt's claim rolled
                            # back), is another state: planned again from.
                            spicedb_called = True
                            landed = await self._token_of_landed(request)
                            await _record(conn, request, landed.zed_token)
                            return landed
                        raise _Differs(current)  # rolls the claim back: nothing was written
                # The row first: a row that refuses the event refuses it before SpiceDB is
                # called, and a SpiceDB failure rolls the row back with the claim.
                await _record(conn, request, None)
                spicedb_called = True
                token = await self._write_and_store(conn, request, write)
            return WriteMembershipsResult(zed_token=token)
        except _Differs as differs:
            return WriteMembershipsResult(found=differs.found)
        except grpc.aio.AioRpcError as err:
            if not failed_precondition(err):
                raise _translate(err, uid) from None
        except _DB_ERRORS as err:
            raise _db_failure(err, uid, after_write=spicedb_called) from None
        return await self._after_failed_precondition(request)

    async def _write_and_store(
        self, conn: Connection, request: WriteMembershipsInput, write: WriteRelationshipsRequest
    ) -> str:
        """Write SpiceDB, then store the ZedToken on the row in the caller's transaction."""
        response = await self._client.WriteRelationships(
            write, timeout=SPICEDB_CALL_TIMEOUT_SECONDS
        )
        token: str = response.written_at.token
        if request.record is not None:
            await record_zed_token(conn, request.record, token)
        return token

    async def _write_if_absent(
        self,
        conn: Connection,
        request: WriteMembershipsInput,
        write: WriteRelationshipsRequest,
        absent: list[Precondition],
    ) -> WriteMembershipsResult | None:
        """Record the row and write, on condition that SpiceDB holds nothing of the user.

        Returns:
            The written result; ``None`` when SpiceDB holds something of the user or the row
            refused the event before the write, with nothing written and the row as it was:
            the read path then judges the state exactly as if this try had not been made (a
            state that differs from ``only_if`` goes before a refusal of the row, and a retry
            recognises its own earlier write before the row is recorded again).
        """
        conditional = WriteRelationshipsRequest()
        conditional.CopyFrom(write)
        conditional.optional_preconditions.extend(absent)
        called = False
        try:
            async with conn.transaction():  # a savepoint: a refusal rolls back the row only
                await _record(conn, request, None)
                called = True
                token = await self._write_and_store(conn, request, conditional)
        except grpc.aio.AioRpcError as err:
            if not failed_precondition(err):
                raise
            return None
        except (SupersededWrite, UserRowMissing, *_DB_ERRORS) as err:
            if not called:
                # Refused before SpiceDB was called: a retry whose earlier attempt landed (and
                # maybe committed) must be judged by the read, which recognises its own write.
                return None
            if isinstance(err, _DB_ERRORS):
                raise _db_failure(err, request.user_id, after_write=True) from None
            raise
        return WriteMembershipsResult(zed_token=token)

    async def _after_failed_precondition(
        self, request: WriteMembershipsInput
    ) -> WriteMembershipsResult:
        try:
            current = await self._read(request.user_id)
            if request.set_marker is not None and current.marker == request.set_marker:
                # An earlier attempt of this very write landed (atomically) and this is its
                # retry: success.
                landed = await self._token_of_landed(request)
                if request.record is not None:
                    try:
                        async with self._pool.acquire() as conn, conn.transaction():
                            await _record(conn, request, landed.zed_token)
                    except _DB_ERRORS as err:
                        raise _db_failure(err, request.user_id, after_write=True) from None
                return landed
        except grpc.aio.AioRpcError as err:
            raise _translate(err, request.user_id) from None
        if (
            request.check_marker
            and request.set_marker is not None
            and (current.marker is None or current.marker < request.set_marker)
        ):
            # An older marker (a backfill wrote the user's pre-existing membership) or none at
            # all (SpiceDB lost its data): not a newer sync, so this one re-plans and applies.
            raise MarkerMoved(
                f"user {request.user_id}: SpiceDB's marker moved to {current.marker} since the"
                " read; nothing was written, plan again"
            )
        raise SupersededWrite(
            f"user {request.user_id}: SpiceDB is at version {current.marker}, this write expected"
            f" {request.expected_marker}; a newer sync has applied, nothing was written"
        )

    async def _token_of_landed(self, request: WriteMembershipsInput) -> WriteMembershipsResult:
        """A ZedToken for a write that already landed: touch its marker again, nothing else."""
        assert request.set_marker is not None
        response = await self._client.WriteRelationships(
            WriteRelationshipsRequest(
                updates=[
                    RelationshipUpdate(
                        operation=_TOUCH,
                        relationship=marker_relationship(request.user_id, request.set_marker),
                    )
                ],
                optional_transaction_metadata=_written_by(request.event_id),
            ),
            timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
        )
        return WriteMembershipsResult(zed_token=response.written_at.token)


async def _record(conn: Connection, request: WriteMembershipsInput, zed_token: str | None) -> None:
    """Record ``request.record`` on the row before the SpiceDB write, or refuse the write.

    With ``zed_token`` the SpiceDB write has already landed (an earlier attempt's): a refusal
    then says so, for the saga to restore SpiceDB.
    """
    event = request.record
    if event is None:
        return
    if zed_token is not None and await recorded_already(conn, event):
        # The attempt that landed also committed the row: nothing to record again (and no
        # trigger to fire twice).
        return
    applied = await record_event(conn, event, zed_token)
    if applied:
        return
    why = (
        f"no row to record version {event.version} on"
        if applied is None
        else f"the App DB already holds a newer version than {event.version}"
    )
    if zed_token is not None:
        raise AppDBRejectedAfterWrite(f"user {event.user_id}: {why}, after the SpiceDB write")
    if applied is None:
        raise UserRowMissing(f"user {event.user_id}: {why}")
    raise SupersededWrite(f"user {event.user_id}: {why}; nothing was written")


def _db_failure(err: BaseException, user_id: str, *, after_write: bool) -> Exception:
    """The typed error for a PostgreSQL failure around an event's SpiceDB write.

    Args:
        err: What PostgreSQL (or the connection) raised.
        user_id: The user whose row it was.
        after_write: Whether SpiceDB may already hold the write: a permanent refusal then means
            SpiceDB must be restored (``AppDBRejectedAfterWrite``), where before the call nothing
            was written (``AppDBRejected``).
    """
    sqlstate = getattr(err, "sqlstate", None)
    if classify_sqlstate(sqlstate) is FailureKind.PERMANENT:
        if after_write:
            # The row's statement after SpiceDB accepted (a trigger, say) was refused: the row
            # rolled back, so SpiceDB must be restored.
            return AppDBRejectedAfterWrite(
                f"user {user_id}: PostgreSQL refused the row after the SpiceDB write ({sqlstate})"
            )
        return AppDBRejected(f"user {user_id}: PostgreSQL refused the write ({sqlstate})")
    # The write may have landed before the commit failed; the retry's precondition (or its
    # ``only_if``) recognises its own earlier write.
    return AppDBUnavailable(
        f"user {user_id}: PostgreSQL unavailable around the SpiceDB write: {type(err).__name__}"
    )


class _Differs(Exception):
    """SpiceDB does not hold what a conditional write requires; carries what it holds."""

    def __init__(self, found: MembershipsSnapshot) -> None:
        super().__init__("SpiceDB holds another state than the write requires")
        self.found = found


def _absent(request: WriteMembershipsInput) -> list[Precondition]:
    """Preconditions that SpiceDB holds nothing of the user, when ``only_if`` says so.

    Empty for any other ``only_if``: "exactly these memberships" has no precondition form
    (a filter cannot say "and nothing else"), so those are read.
    """
    expected = request.only_if
    if expected is None or expected.memberships or expected.marker is not None:
        return []
    uid = request.user_id
    return [
        Precondition(
            operation=Precondition.Operation.OPERATION_MUST_NOT_MATCH,
            filter=RelationshipFilter(
                resource_type="organization",
                optional_relation=relation,
                optional_subject_filter=SubjectFilter(subject_type="user", optional_subject_id=uid),
            ),
        )
        for relation in sorted(MANAGED_RELATIONS)
    ] + [
        Precondition(
            operation=Precondition.Operation.OPERATION_MUST_NOT_MATCH,
            filter=marker_filter(uid, None),
        )
    ]


def _intended(request: WriteMembershipsInput) -> MembershipsSnapshot:
    """What SpiceDB holds once ``request`` (with its ``only_if``) has landed."""
    assert request.only_if is not None
    kept = [m for m in request.only_if.memberships if m not in request.remove]
    return MembershipsSnapshot(
        memberships=kept + [m for m in request.add if m not in kept], marker=request.set_marker
    )


def _holds(current: MembershipsSnapshot, expected: MembershipsSnapshot) -> bool:
    """Whether SpiceDB's ``current`` state is ``expected``, in any order."""

    def key(snapshot: MembershipsSnapshot) -> set[tuple[str, str, str]]:
        return {(m.user_id, m.org_id, m.role) for m in snapshot.memberships}

    return current.marker == expected.marker and key(current) == key(expected)
