import grpc
import pytest

from spicesync.errors import FailureKind, classify_grpc_status, classify_sqlstate
from spicesync.stack.spicedb_host import parse_engine_error

T, P = FailureKind.TRANSIENT, FailureKind.PERMANENT


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, T),
        (grpc.StatusCode.DEADLINE_EXCEEDED, T),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, T),
        (grpc.StatusCode.ABORTED, T),
        (grpc.StatusCode.INTERNAL, T),
        (grpc.StatusCode.UNKNOWN, T),
        (grpc.StatusCode.CANCELLED, T),
        (grpc.StatusCode.INVALID_ARGUMENT, P),
        (grpc.StatusCode.FAILED_PRECONDITION, P),
        (grpc.StatusCode.ALREADY_EXISTS, P),
        (grpc.StatusCode.NOT_FOUND, P),
        # A wrong key is the deployment's fault, not the event's: retry, never compensate.
        (grpc.StatusCode.UNAUTHENTICATED, T),
        (grpc.StatusCode.PERMISSION_DENIED, T),
        (grpc.StatusCode.UNIMPLEMENTED, P),
    ],
)
def test_grpc_codes(code: grpc.StatusCode, kind: FailureKind) -> None:
    assert classify_grpc_status(code) is kind


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("23505", P),  # unique_violation
        ("23514", P),  # check_violation
        ("23502", P),  # not_null_violation
        ("22001", P),  # string_data_right_truncation
        ("22P02", P),  # invalid_text_representation
        ("42601", P),  # syntax_error
        ("42501", P),  # insufficient_privilege
        # An App DB not yet migrated to what the code expects: wait for the migration.
        ("42P01", T),  # undefined_table
        ("42703", T),  # undefined_column
        ("08006", T),  # connection_failure
        ("08001", T),  # sqlclient_unable_to_establish_sqlconnection
        ("57P01", T),  # admin_shutdown
        ("57P03", T),  # cannot_connect_now
        ("53300", T),  # too_many_connections
        ("40001", T),  # serialization_failure
        ("40P01", T),  # deadlock_detected
        (None, T),  # connection lost before any answer
    ],
)
def test_sqlstates(sqlstate: str | None, kind: FailureKind) -> None:
    assert classify_sqlstate(sqlstate) is kind


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (
            "rpc error: code = FailedPrecondition desc = relation/permission `owner` not found",
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        ("rpc error: code = InvalidArgument desc = bad id", grpc.StatusCode.INVALID_ARGUMENT),
        ("rpc error: code = AlreadyExists desc = dup", grpc.StatusCode.ALREADY_EXISTS),
        ("rpc error: code = DeadlineExceeded desc = slow", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("rpc error: code = Canceled desc = gone", grpc.StatusCode.CANCELLED),
        ("something else entirely", grpc.StatusCode.UNKNOWN),
    ],
)
def test_engine_errors_keep_their_status_code(message: str, code: grpc.StatusCode) -> None:
    parsed_code, details = parse_engine_error(message)
    assert parsed_code is code
    assert details  # SpiceDB's own text survives
