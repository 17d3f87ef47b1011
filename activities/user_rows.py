"""App DB steps of the saga: insert the user's row, mark it synced, and delete it to compensate.

Every statement is idempotent on the business key (the user id), because an activity may run
more than once: a worker can commit and die before Temporal hears about it.
"""

from __future__ import annotations

import asyncpg
from temporalio import activity

from spicesync.errors import AppDBRejected, AppDBUnavailable, DuplicateEmail, UserRowMissing
from spicesync.failures import FailureKind, classify_sqlstate
from spicesync.models import (
    DeleteUserRowInput,
    DeleteUserRowResult,
    InsertUserRowInput,
    InsertUserRowResult,
    MarkUserSyncedInput,
    MarkUserSyncedResult,
)

__all__ = ["UserRowActivities"]

_EMAIL_INDEX = "users_email_lower_key"

_INSERT = """
INSERT INTO users (id, email, name, org_id, role, created_by_run)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (id) DO NOTHING
RETURNING created_by_run
"""
_OWNER = "SELECT created_by_run FROM users WHERE id = $1"
_MARK_SYNCED = """
UPDATE users
SET sync_status = 'synced', zed_token = $2, synced_at = now(), updated_at = now()
WHERE id = $1
RETURNING sync_status
"""
# Compensation deletes a row only if this run inserted it: a row that existed before the run
# (or belongs to another run) is never removed by this run's rollback.
_DELETE_OWN = "DELETE FROM users WHERE id = $1 AND created_by_run = $2"


def _translate(err: BaseException, user_id: str) -> Exception:
    """Map a PostgreSQL failure onto the saga's error types."""
    if isinstance(err, asyncpg.UniqueViolationError) and err.constraint_name == _EMAIL_INDEX:
        return DuplicateEmail(f"user {user_id}: the email is already used by another user id")
    sqlstate = getattr(err, "sqlstate", None)
    if classify_sqlstate(sqlstate) is FailureKind.PERMANENT:
        return AppDBRejected(f"user {user_id}: PostgreSQL rejected the statement ({sqlstate})")
    return AppDBUnavailable(f"user {user_id}: PostgreSQL unavailable: {type(err).__name__}")


_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# Errors are re-raised "from None": Temporal stores an exception's cause chain in the history,
# and PostgreSQL's DETAIL text quotes the offending values (an email, say).


class UserRowActivities:
    """Activities on the ``users`` table, sharing the worker's one connection pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @activity.defn
    async def insert_user_row(self, row: InsertUserRowInput) -> InsertUserRowResult:
        """Insert the user's row, owned by ``row.run_id``.

        Idempotent: if the same user id is already there the step succeeds, and ``created`` says
        whether this run owns the row (an earlier attempt of this run may have committed it).

        Raises:
            DuplicateEmail: Another user id has this email (case-insensitively).
            AppDBRejected: Another permanent PostgreSQL error.
            AppDBUnavailable: A transient PostgreSQL error; the retry policy retries it.
        """
        try:
            async with self._pool.acquire() as conn:
                inserted = await conn.fetchval(
                    _INSERT, row.user_id, row.email, row.name, row.org_id, row.role, row.run_id
                )
                if inserted is not None:
                    return InsertUserRowResult(created=True)
                owner = await conn.fetchval(_OWNER, row.user_id)
        except _DB_ERRORS as err:
            raise _translate(err, row.user_id) from None
        return InsertUserRowResult(created=owner == row.run_id)

    @activity.defn
    async def mark_user_synced(self, synced: MarkUserSyncedInput) -> MarkUserSyncedResult:
        """Store the ZedToken and mark the row synced (idempotent).

        Raises:
            UserRowMissing: The row is gone.
            AppDBRejected: Another permanent PostgreSQL error.
            AppDBUnavailable: A transient PostgreSQL error; retried.
        """
        try:
            status = await self._pool.fetchval(_MARK_SYNCED, synced.user_id, synced.zed_token)
        except _DB_ERRORS as err:
            raise _translate(err, synced.user_id) from None
        if status is None:
            raise UserRowMissing(f"user {synced.user_id}: the row disappeared before it synced")
        return MarkUserSyncedResult(status=status)

    @activity.defn
    async def delete_user_row(self, row: DeleteUserRowInput) -> DeleteUserRowResult:
        """Compensation: delete the row if, and only if, ``row.run_id`` inserted it.

        Raises:
            AppDBUnavailable: A transient PostgreSQL error; retried until it succeeds.
        """
        try:
            result = await self._pool.execute(_DELETE_OWN, row.user_id, row.run_id)
        except _DB_ERRORS as err:
            raise _translate(err, row.user_id) from None
        return DeleteUserRowResult(deleted=result != "DELETE 0")
