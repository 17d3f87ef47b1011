"""SpiceDB's answers, mapped onto the saga's error types."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from activities.memberships import _translate
from spicesync.errors import SchemaMismatch, SpiceDBRejected, SpiceDBUnavailable


def rpc_error(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details)


@pytest.mark.parametrize(
    "details",
    [
        "relation `admin` not found under definition `organization`",
        # An empty schema: SpiceDB restarted without its data, before the schema is rewritten.
        "object definition `organization` not found",
    ],
)
def test_a_schema_that_lacks_what_spicesync_writes_is_a_schema_mismatch(details: str) -> None:
    err = _translate(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, details), "u")
    assert isinstance(err, SchemaMismatch)


def test_other_refusals_and_outages_keep_their_class() -> None:
    refused = _translate(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad object id"), "u")
    down = _translate(rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"), "u")
    assert isinstance(refused, SpiceDBRejected)
    assert isinstance(down, SpiceDBUnavailable)
