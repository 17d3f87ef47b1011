"""The span scrubber: what a failed span keeps, and what never leaves the process."""

from __future__ import annotations

import asyncpg
import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from spicesync.span_scrubbing import ScrubbingSpanExporter

EMAIL = "ann.quist@example.com"


@pytest.fixture
def exported() -> tuple[TracerProvider, InMemorySpanExporter]:
    sink = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ScrubbingSpanExporter(sink)))
    return provider, sink


def test_a_database_error_keeps_its_class_and_sqlstate_not_its_detail(
    exported: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, sink = exported
    # What asyncpg raises for PostgreSQL's answer to a duplicate email, detail included.
    error = asyncpg.PostgresError.new(
        {
            "C": "23505",
            "M": 'duplicate key value violates unique constraint "users_email_lower_key"',
            "D": f"Key (lower(email))=({EMAIL}) already exists.",
        }
    )
    assert EMAIL in str(error)
    attributes = {
        "db.system": "postgresql",
        "db.statement": "INSERT INTO users (email) VALUES ($1)",
        "db.statement.parameters": f"('{EMAIL}',)",
    }
    # As the asyncpg instrumentation does: the SDK records the exception and the status.
    span_of = provider.get_tracer("test").start_as_current_span("INSERT", attributes=attributes)
    with pytest.raises(asyncpg.UniqueViolationError), span_of:
        raise error
    (span,) = sink.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "UniqueViolationError (SQLSTATE 23505)"
    assert dict(span.attributes or {}) == {
        "db.system": "postgresql",
        "db.statement": "INSERT INTO users (email) VALUES ($1)",
    }
    (event,) = span.events
    assert dict(event.attributes or {}) == {
        "exception.type": "asyncpg.exceptions.UniqueViolationError",
        "exception.escaped": "False",
    }
    assert EMAIL not in span.to_json()


def test_a_grpc_error_keeps_its_status_code_name(
    exported: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, sink = exported
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details=f"object id `{EMAIL}` is not valid",
    )
    span_of = provider.get_tracer("test").start_as_current_span(
        "/authzed.api.v1.PermissionsService/WriteRelationships",
        attributes={"rpc.system": "grpc", "rpc.grpc.status_code": 3},
    )
    with pytest.raises(grpc.aio.AioRpcError), span_of:
        raise error
    (span,) = sink.get_finished_spans()
    assert span.status.description == "AioRpcError (gRPC INVALID_ARGUMENT)"
    assert EMAIL not in span.to_json()


def test_a_status_without_an_exception_says_only_the_code(
    exported: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, sink = exported
    # The gRPC instrumentation's unary callback: the status carries SpiceDB's details only.
    span = provider.get_tracer("test").start_span(
        "/authzed.api.v1.PermissionsService/CheckPermission",
        attributes={"rpc.grpc.status_code": 9, "app.user.email": EMAIL},
    )
    span.set_status(StatusCode.ERROR, f"relation `owner` of {EMAIL} not found")
    span.end()
    (done,) = sink.get_finished_spans()
    assert done.status.description == "gRPC FAILED_PRECONDITION"
    assert dict(done.attributes or {}) == {"rpc.grpc.status_code": 9}


def test_ids_parents_and_timing_are_kept_and_inlined_literals_masked(
    exported: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, sink = exported
    tracer = provider.get_tracer("test")
    attributes = {
        "temporalWorkflowID": "user-1",
        "db.statement": f"SELECT 1 FROM users WHERE email = '{EMAIL}' AND note = 'it''s'",
    }
    with (
        tracer.start_as_current_span("RunActivity:insert_created_row") as parent,
        tracer.start_as_current_span("SELECT", attributes=attributes) as original,
    ):
        pass
    child, _ = sink.get_finished_spans()
    assert child.context == original.get_span_context()
    assert child.parent is not None and child.parent.span_id == parent.get_span_context().span_id
    assert child.start_time and child.end_time and child.start_time <= child.end_time
    assert (child.attributes or {})["temporalWorkflowID"] == "user-1"
    assert (child.attributes or {})["db.statement"] == (
        "SELECT 1 FROM users WHERE email = '?' AND note = '?'"
    )
    assert child.status.status_code is StatusCode.UNSET
