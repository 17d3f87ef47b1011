"""Classify store failures as transient (retry durably) or permanent (fail fast, compensate)."""

from __future__ import annotations

import enum

import grpc

__all__ = ["FailureKind", "classify_grpc_status", "classify_sqlstate"]


class FailureKind(enum.StrEnum):
    """How the saga reacts to a failure."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"


# Codes where SpiceDB has looked at the request and said no: sending it again gives the same
# answer. UNAUTHENTICATED and PERMISSION_DENIED are not here: they say the worker's key is wrong,
# not the event, so rolling the event back would throw away a valid user because of a deployment
# mistake. They retry (a visible stuck activity) until a worker with the right key takes over,
# and a worker refuses to start with a key SpiceDB rejects.
_PERMANENT_GRPC: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
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
    return FailureKind.PERMANENT if code in _PERMANENT_GRPC else FailureKind.TRANSIENT


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
