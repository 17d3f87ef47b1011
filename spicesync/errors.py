"""Typed business errors.

An activity raises one of these for a failure that retrying cannot fix; Temporal records it
under the class name as the ``ApplicationError`` type, and :data:`NON_RETRYABLE_ERROR_TYPES`
(the only list of them) tells every ``RetryPolicy`` not to retry it. Anything else an activity
raises is treated as transient and retried with backoff until it succeeds.

Messages carry opaque ids and error codes only, never an email or a name: they end up in the
workflow history.

:func:`classify_grpc_status` and :func:`classify_sqlstate` tell which store failures are
transient (retry durably) and which permanent (fail fast, compensate).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, ClassVar, Final

from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

if TYPE_CHECKING:
    import grpc

__all__ = [
    "NON_RETRYABLE_ERROR_TYPES",
    "WRITTEN_THEN_REFUSED_ERROR_TYPES",
    "AppDBRejected",
    "AppDBRejectedAfterWrite",
    "AppDBUnavailable",
    "DuplicateEmail",
    "EventIdConflict",
    "FailureKind",
    "InvalidUserInput",
    "MarkerChanged",
    "MarkerMoved",
    "PermanentSyncError",
    "RowUnmappable",
    "SchemaMismatch",
    "SpiceDBRejected",
    "SpiceDBUnavailable",
    "SupersededWrite",
    "UserRowMissing",
    "classify_grpc_status",
    "classify_sqlstate",
]


class PermanentSyncError(ApplicationError):
    """Base class of failures that must not be retried: the saga compensates instead.

    The ``ApplicationError`` type is the class name, which is what ``non_retryable_error_types``
    matches. Expected business outcomes are marked benign, so the SDK logs them at DEBUG instead
    of printing a stack trace for every refused user; configuration problems stay loud.
    """

    benign: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            type=type(self).__name__,
            category=ApplicationErrorCategory.BENIGN
            if self.benign
            else ApplicationErrorCategory.UNSPECIFIED,
        )


class InvalidUserInput(PermanentSyncError):
    """The event's fields are malformed; nothing was written."""

    benign = True


class DuplicateEmail(PermanentSyncError):
    """Another user id already owns this email (compared case-insensitively)."""

    benign = True


class EventIdConflict(PermanentSyncError):
    """The event id was already used for an event with different content.

    An event id is the idempotency key of one event of one user: the same id with the same
    content is a duplicate (it gets the first delivery's outcome), the same id with anything
    different (kind, version, organization, role, email, name) is refused with this error.
    Nothing of this delivery was applied; the first event's outcome stands. Raised to the
    caller by the starters (the user's workflow answers the delivery with this error type), not
    by an activity.
    """

    benign = True

    def __init__(self, message: str, *, user_id: str = "", event_id: str = "") -> None:
        super().__init__(message)
        self.user_id = user_id
        self.event_id = event_id


class AppDBRejected(PermanentSyncError):
    """PostgreSQL refused the statement for a reason retrying cannot fix (e.g. a constraint)."""


class AppDBRejectedAfterWrite(PermanentSyncError):
    """PostgreSQL refused for good *after* SpiceDB accepted the write it was wrapped around.

    The transaction rolled the row back; SpiceDB holds the event's write, so the saga restores
    SpiceDB's prior state (unlike every other refusal, after which nothing was written).
    """


class SpiceDBRejected(PermanentSyncError):
    """SpiceDB refused the call for good (INVALID_ARGUMENT, FAILED_PRECONDITION, ...)."""


class UserRowMissing(PermanentSyncError):
    """The user's row is gone, so the event cannot be recorded on it."""


class SchemaMismatch(PermanentSyncError):
    """SpiceDB's schema lacks a definition or relation spicesync writes: an operator must fix it.

    Not compensated: the sync parks until the schema is fixed and it is resumed.
    """


class SupersededWrite(PermanentSyncError):
    """SpiceDB's version marker moved past this write: a newer sync already applied."""


class MarkerMoved(PermanentSyncError):
    """SpiceDB's version marker moved to an *older* version since the write was planned.

    A backfill wrote the user's pre-existing membership between this sync's read and its write.
    Nothing was written; the sync reads again and re-plans (not retried as is: the expected
    marker in the request is out of date).
    """

    benign = True


class RowUnmappable(PermanentSyncError):
    """Follow mode: the application's row maps to no valid relationship (an invalid object id).

    Nothing was written to SpiceDB; the failure is recorded in ``spicesync_followed_users`` and
    the next change of the user tries again. The message names the mapping's rule and column,
    never the value.
    """

    benign = True


NON_RETRYABLE_ERROR_TYPES: Final[list[str]] = [
    InvalidUserInput.__name__,
    DuplicateEmail.__name__,
    AppDBRejected.__name__,
    AppDBRejectedAfterWrite.__name__,
    SpiceDBRejected.__name__,
    UserRowMissing.__name__,
    SupersededWrite.__name__,
    SchemaMismatch.__name__,
    MarkerMoved.__name__,
    RowUnmappable.__name__,
]


# The refusals after which a SpiceDB write may have landed (after every other one, nothing was).
WRITTEN_THEN_REFUSED_ERROR_TYPES: Final[frozenset[str]] = frozenset(
    {AppDBRejectedAfterWrite.__name__}
)


class AppDBUnavailable(Exception):
    """PostgreSQL could not be reached or answered with a transient error; retried."""


class SpiceDBUnavailable(Exception):
    """SpiceDB could not be reached or answered with a transient error; retried."""


class MarkerChanged(Exception):
    """Follow mode: the user's marker moved between a sync's read and its write; retried.

    Nothing was written (the write's precondition failed). Something else wrote the user's
    relationships meanwhile (an older attempt of the same sync that woke up late, say); the
    retry reads both stores again and writes what is still missing.
    """


class FailureKind(enum.StrEnum):
    """How the saga reacts to a failure."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"


# Codes where SpiceDB has looked at the request and said no: sending it again gives the same
# answer. UNAUTHENTICATED and PERMISSION_DENIED are not here: they say the worker's key is wrong,
# not the event, so rolling the event back would throw away a valid user because of a deployment
# mistake. They retry (a visible stuck activity) until a worker with the right key takes over,
# and a worker refuses to start with a key SpiceDB rejects.
# By name: this module is shared with the client, which does not need grpc installed.
_PERMANENT_GRPC: frozenset[str] = frozenset(
    {
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "ALREADY_EXISTS",
        "NOT_FOUND",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
    }
)


def classify_grpc_status(code: grpc.StatusCode) -> FailureKind:
    """Classify a SpiceDB gRPC status code.

    UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, CANCELLED, INTERNAL and UNKNOWN
    are transient: the same request may succeed later, and an unknown failure that keeps
    recurring stays visible as a retrying activity instead of silently compensating.

    Args:
        code: The status code of the failed call.

    Returns:
        The failure kind.
    """
    return FailureKind.PERMANENT if code.name in _PERMANENT_GRPC else FailureKind.TRANSIENT


# SQLSTATE classes (first two characters) whose errors are about the statement or the data.
_PERMANENT_SQLSTATE_CLASSES: frozenset[str] = frozenset(
    {
        "22",  # data exception (value too long, invalid text representation, ...)
        "23",  # integrity constraint violation (unique, check, not null, foreign key)
        "42",  # syntax error or access rule violation
        "44",  # WITH CHECK OPTION violation
    }
)
# Except an App DB whose schema is behind the code (workers deployed before the migration ran):
# retrying helps once an operator migrates, and failing would roll back valid users. The sync
# waits, visibly stuck, instead. Found by `spicesync chaos` when workers met an older database.
_SCHEMA_BEHIND: frozenset[str] = frozenset(
    {
        "42703",  # undefined_column
        "42P01",  # undefined_table
        "42883",  # undefined_function
    }
)


def classify_sqlstate(sqlstate: str | None) -> FailureKind:
    """Classify a PostgreSQL error by its SQLSTATE.

    Connection exceptions (class 08), resource shortages (53), server shutdowns (57P0x),
    serialization failures and deadlocks are transient, and so is a schema behind the code
    (undefined table, column or function: it waits for the migration). Data, integrity and
    syntax errors are permanent. A missing SQLSTATE (the connection broke before the server
    answered) is transient.

    Args:
        sqlstate: The five-character SQLSTATE, or ``None`` if there was none.

    Returns:
        The failure kind.
    """
    if sqlstate in _SCHEMA_BEHIND:
        return FailureKind.TRANSIENT
    if sqlstate is not None and sqlstate[:2] in _PERMANENT_SQLSTATE_CLASSES:
        return FailureKind.PERMANENT
    return FailureKind.TRANSIENT
