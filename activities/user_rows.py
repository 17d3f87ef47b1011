"""App DB steps of the per-user saga.

Read the user's state, insert a created user's row, record an applied event on the row (or
delete it, leaving a tombstone), and undo an insert.

Every statement is idempotent on the business key (the user id) and guarded by the event's
version, because an activity may run more than once: a worker can commit and die before Temporal
hears about it, and an old attempt can wake up late.
"""

from __future__ import annotations

import uuid

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from temporalio import activity

from spicesync.errors import (
    AppDBRejected,
    AppDBUnavailable,
    DuplicateEmail,
    FailureKind,
    UserRowMissing,
    classify_sqlstate,
)
from spicesync.models import (
    ApplyRowInput,
    ApplyRowResult,
    InsertCreatedRowInput,
    InsertCreatedRowResult,
    ReadUserStateInput,
    RecordRepairInput,
    UndoCreatedRowInput,
    UserEvent,
    UserState,
)

__all__ = [
    "Connection",
    "UserRowActivities",
    "record_event",
    "record_zed_token",
    "recorded_already",
]

# A connection of its own or one borrowed from the pool.
Connection = asyncpg.Connection | PoolConnectionProxy

_EMAIL_INDEX = "users_email_lower_key"

_READ_STATE = """
SELECT u.version, u.org_id, u.role, u.applied_event, u.zed_token, u.created_by_event,
       (u.sync_status = 'pending' AND u.created_by_event IS NOT NULL) AS creating,
       t.version AS tombstone, t.deleted_by_event
FROM (SELECT $1::uuid AS id) k
LEFT JOIN users u ON u.id = k.id
LEFT JOIN user_tombstones t ON t.id = k.id
"""
_INSERT = """
INSERT INTO users (id, email, name, org_id, role, version, created_by_event)
SELECT $1, $2, $3, $4, $5, $6, $7
WHERE NOT EXISTS (SELECT 1 FROM user_tombstones WHERE id = $1 AND version >= $6)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
_EXISTING = "SELECT version, created_by_event FROM users WHERE id = $1"
_RECORD = """
UPDATE users
SET org_id = $2, role = $3, version = $4, zed_token = $5, applied_event = $6,
    sync_status = 'synced', synced_at = now(), updated_at = now(), permissions_written_at = now()
WHERE id = $1 AND version <= $4
RETURNING id
"""
_DELETE = "DELETE FROM users WHERE id = $1 AND version < $2 RETURNING id"
_TOMBSTONE = """
INSERT INTO user_tombstones (id, version, deleted_by_event) VALUES ($1, $2, $3)
ON CONFLICT (id) DO UPDATE SET version = GREATEST(user_tombstones.version, EXCLUDED.version),
                               deleted_by_event = CASE
                                   WHEN EXCLUDED.version >= user_tombstones.version
                                   THEN EXCLUDED.deleted_by_event
                                   ELSE user_tombstones.deleted_by_event END,
                               deleted_at = now()
"""
_ZED_TOKEN = "UPDATE users SET zed_token = $3 WHERE id = $1 AND version = $2"
_RECORD_REPAIR = """
UPDATE users
SET zed_token = $3, sync_status = 'synced', synced_at = now(), permissions_written_at = now()
WHERE id = $1 AND version = $2
"""
_NEWER_ROW = "SELECT 1 FROM users WHERE id = $1 AND version >= $2"
# Compensation deletes a row only if this event inserted it: a row that existed before is never
# removed by a rollback.
_UNDO_INSERT = "DELETE FROM users WHERE id = $1 AND created_by_event = $2"

# Errors are re-raised "from None": Temporal stores an exception's cause chain in the history,
# and PostgreSQL's DETAIL text quotes the offending values (an email, say).
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _translate(err: BaseException, user_id: str) -> Exception:
    """Map a PostgreSQL failure onto the saga's error types."""
    if isinstance(err, asyncpg.UniqueViolationError) and err.constraint_name == _EMAIL_INDEX:
        return DuplicateEmail(f"user {user_id}: the email is already used by another user id")
    sqlstate = getattr(err, "sqlstate", None)
    if classify_sqlstate(sqlstate) is FailureKind.PERMANENT:
        return AppDBRejected(f"user {user_id}: PostgreSQL rejected the statement ({sqlstate})")
    return AppDBUnavailable(f"user {user_id}: PostgreSQL unavailable: {type(err).__name__}")


async def record_event(conn: Connection, event: UserEvent, zed_token: str | None) -> bool | None:
    """Bring the user's row to ``event``, inside the caller's transaction.

    A ``deleted`` event deletes the row and leaves a tombstone; any other sets the membership,
    version, ZedToken and ``synced``.

    Returns:
        True if recorded; False if the row already holds a newer version; None if a non-delete
        event found no row.
    """
    user_id = uuid.UUID(event.user_id)
    if event.kind == "deleted":
        if await conn.fetchval(_NEWER_ROW, user_id, event.version):
            return False
        await conn.execute(_DELETE, user_id, event.version)
        await conn.execute(_TOMBSTONE, user_id, event.version, event.event_id)
        return True
    updated = await conn.fetchval(
        _RECORD, user_id, event.org_id, event.role, event.version, zed_token, event.event_id
    )
    if updated is not None:
        return True
    exists = await conn.fetchval("SELECT 1 FROM users WHERE id = $1", user_id)
    return None if exists is None else False


async def recorded_already(conn: Connection, event: UserEvent) -> bool:
    """Whether the row (or, for a deletion, the tombstone) already records ``event``."""
    user_id = uuid.UUID(event.user_id)
    if event.kind == "deleted":
        query = "SELECT 1 FROM user_tombstones WHERE id = $1 AND deleted_by_event = $2"
    else:
        query = "SELECT 1 FROM users WHERE id = $1 AND applied_event = $2"
    return await conn.fetchval(query, user_id, event.event_id) is not None


async def record_zed_token(conn: Connection, event: UserEvent, zed_token: str) -> None:
    """Store the ZedToken of ``event``'s SpiceDB write on the row ``record_event`` brought to it."""
    if event.kind != "deleted":
        await conn.execute(_ZED_TOKEN, uuid.UUID(event.user_id), event.version, zed_token)


class UserRowActivities:
    """Activities on the ``users`` table, sharing the worker's one connection pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @activity.defn
    async def read_user_state(self, request: ReadUserStateInput) -> UserState:
        """Read the version applied to the user and where the user belongs.

        A deleted user reads as not existing, at the version of its deletion; a user whose
        creation is still pending reads as not existing yet.

        Raises:
            AppDBUnavailable: A transient PostgreSQL error; retried.
        """
        try:
            return await _read_state(self._pool, uuid.UUID(request.user_id))
        except _DB_ERRORS as err:
            raise _translate(err, request.user_id) from None

    @activity.defn
    async def insert_created_row(self, request: InsertCreatedRowInput) -> InsertCreatedRowResult:
        """Insert the row of a ``created`` event, pending until its permissions are written.

        Idempotent: if this event (in an earlier attempt) already inserted the row, ``created``
        is still true; if the user exists from an older version, ``created`` is false; if a
        newer version (or a newer deletion) exists, ``stale`` is true and nothing is written.

        With ``read_first`` (a new run's first event, instead of a read step before it) the
        user's state is read first, in the same transaction, and returned as ``prior``; unless
        the App DB has never seen the user (or holds only this event's own pending row), nothing
        is written and ``skipped`` is true: the workflow judges the event against ``prior``.

        Raises:
            DuplicateEmail: Another user id has this email (case-insensitively).
            AppDBRejected: Another permanent PostgreSQL error.
            AppDBUnavailable: A transient PostgreSQL error; retried.
        """
        e = request.event
        user_id = uuid.UUID(e.user_id)
        prior: UserState | None = None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if request.read_first:
                    prior = await _read_state(conn, user_id)
                    if not _unseen(prior, e.event_id):
                        return InsertCreatedRowResult(
                            created=False, stale=False, prior=prior, skipped=True
                        )
                inserted = await conn.fetchval(
                    _INSERT, user_id, e.email, e.name, e.org_id, e.role, e.version, e.event_id
                )
                if inserted is not None:
                    await conn.execute("DELETE FROM user_tombstones WHERE id = $1", user_id)
                    return InsertCreatedRowResult(created=True, stale=False, prior=prior)
                existing = await conn.fetchrow(_EXISTING, user_id)
        except _DB_ERRORS as err:
            raise _translate(err, e.user_id) from None
        if existing is None:  # not inserted and not there: a newer deletion's tombstone
            return InsertCreatedRowResult(created=False, stale=True, prior=prior)
        if existing["created_by_event"] == e.event_id:
            return InsertCreatedRowResult(created=True, stale=False, prior=prior)
        return InsertCreatedRowResult(
            created=False, stale=existing["version"] >= e.version, prior=prior
        )

    @activity.defn
    async def apply_row(self, request: ApplyRowInput) -> ApplyRowResult:
        """Record an applied event on the row: new membership, version and ZedToken, synced.

        A ``deleted`` event deletes the row and leaves a tombstone, in one transaction.

        Returns:
            ``applied`` false if the row already holds this version or a newer one.

        Raises:
            UserRowMissing: A non-delete event found no row.
            AppDBRejected: A permanent PostgreSQL error.
            AppDBUnavailable: A transient PostgreSQL error; retried.
        """
        e = request.event
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                applied = await record_event(conn, e, request.zed_token)
        except _DB_ERRORS as err:
            raise _translate(err, e.user_id) from None
        if applied is None:
            raise UserRowMissing(f"user {e.user_id}: no row to record version {e.version} on")
        return ApplyRowResult(applied=applied)

    @activity.defn
    async def undo_created_row(self, request: UndoCreatedRowInput) -> None:
        """Compensation: delete the row if, and only if, ``request.event_id`` inserted it.

        Raises:
            AppDBUnavailable: A transient PostgreSQL error; retried until it succeeds.
        """
        try:
            await self._pool.execute(_UNDO_INSERT, uuid.UUID(request.user_id), request.event_id)
        except _DB_ERRORS as err:
            raise _translate(err, request.user_id) from None

    @activity.defn
    async def record_repair(self, request: RecordRepairInput) -> None:
        """Record a repair's ZedToken on the row, unless the row has moved on meanwhile.

        Raises:
            AppDBUnavailable: A transient PostgreSQL error; retried.
        """
        try:
            await self._pool.execute(
                _RECORD_REPAIR, uuid.UUID(request.user_id), request.version, request.zed_token
            )
        except _DB_ERRORS as err:
            raise _translate(err, request.user_id) from None


async def _read_state(conn: Connection | asyncpg.Pool, user_id: uuid.UUID) -> UserState:
    """The user's App DB state: the version applied and where the user belongs.

    A deleted user reads as not existing, at the version of its deletion; a user whose creation
    is still pending reads as not existing yet.
    """
    row = await conn.fetchrow(_READ_STATE, user_id)
    assert row is not None
    # A row spicesync inserted for a creation that never finished (its worker died before the
    # workflow recorded the insert, say) is not applied: the creation, delivered again or
    # replayed, is applied rather than judged stale. (A row the app wrote itself, never synced,
    # is a user that exists: the backfill's business.)
    if row["version"] is not None and not row["creating"]:
        return UserState(
            exists=True,
            version=row["version"],
            org_id=row["org_id"],
            role=row["role"],
            applied_event=row["applied_event"],
            zed_token=row["zed_token"],
        )
    return UserState(
        exists=False,
        version=row["tombstone"] or 0,
        applied_event=row["deleted_by_event"],
        unfinished_creation=row["created_by_event"] if row["creating"] else None,
    )


def _unseen(state: UserState, event_id: str) -> bool:
    """Whether the App DB knows nothing of the user but, at most, this event's own pending row."""
    return (
        not state.exists
        and state.version == 0
        and state.applied_event is None
        and state.unfinished_creation in (None, event_id)
    )
