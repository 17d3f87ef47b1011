"""Typed business errors.

An activity raises one of these for a failure that retrying cannot fix; Temporal records it
under the class name as the ``ApplicationError`` type, and :data:`NON_RETRYABLE_ERROR_TYPES`
(the only list of them) tells every ``RetryPolicy`` not to retry it. Anything else an activity
raises is treated as transient and retried with backoff until it succeeds.

Messages carry opaque ids and error codes only, never an email or a name: they end up in the
workflow history.
"""

from __future__ import annotations

from typing import ClassVar, Final

from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

__all__ = [
    "NON_RETRYABLE_ERROR_TYPES",
    "AppDBRejected",
    "AppDBUnavailable",
    "DuplicateEmail",
    "EventIdConflict",
    "InvalidUserInput",
    "MarkerMoved",
    "PermanentSyncError",
    "SchemaMismatch",
    "SpiceDBRejected",
    "SpiceDBUnavailable",
    "SupersededWrite",
    "UserRowMissing",
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


NON_RETRYABLE_ERROR_TYPES: Final[list[str]] = [
    InvalidUserInput.__name__,
    DuplicateEmail.__name__,
    AppDBRejected.__name__,
    SpiceDBRejected.__name__,
    UserRowMissing.__name__,
    SupersededWrite.__name__,
    SchemaMismatch.__name__,
    MarkerMoved.__name__,
]


class AppDBUnavailable(Exception):
    """PostgreSQL could not be reached or answered with a transient error; retried."""


class SpiceDBUnavailable(Exception):
    """SpiceDB could not be reached or answered with a transient error; retried."""
