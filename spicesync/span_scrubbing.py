"""Keep row values out of exported spans: every span passes an allow-list before it leaves.

The instrumentations spicesync uses write free text into spans when something fails: the
asyncpg and gRPC instrumentations and the Temporal SDK set a span's status description to
``"<class>: <message>"`` and record exception events with the message and the stack trace. A
PostgreSQL message quotes the row (``DETAIL: Key (lower(email))=(ann@example.com) already
exists``, ``Failing row contains (...)``), so a refused user's email or name would reach the
tracing backend, which is usually kept longer and shown to more people than the database.

:class:`ScrubbingSpanExporter` wraps the real exporter (OTLP or the JSON-lines file), so every
span from every source goes through it. It keeps only what is known to carry no row value:

* attributes whose keys are on :data:`ALLOWED_ATTRIBUTES` (ids, SQL text with ``$n``
  placeholders, peer addresses, gRPC codes); every other attribute is dropped, whatever it holds;
* SQL text with any quoted literal masked, in case a statement ever inlines a value;
* exception events reduced to ``exception.type`` (and ``exception.escaped``);
* an error status whose description is rebuilt from the error's class and its SQLSTATE or gRPC
  status code, never from the message.

Allow-listing rather than looking for emails: a value never looked at cannot slip through.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

import asyncpg.exceptions
import grpc
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Status, StatusCode
from opentelemetry.util.types import AttributeValue

__all__ = [
    "ALLOWED_ATTRIBUTES",
    "ALLOWED_EXCEPTION_ATTRIBUTES",
    "ScrubbingSpanExporter",
    "scrub_span",
]

ALLOWED_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {
        # Temporal SDK (TracingInterceptor): opaque ids and type names.
        "temporalWorkflowID",
        "temporalRunID",
        "temporalActivityID",
        "temporalActivityType",
        "temporalUpdateID",
        # asyncpg, old and new semantic conventions. Statement parameters
        # (``db.statement.parameters``) are not here: they are the row's values.
        "db.system",
        "db.system.name",
        "db.name",
        "db.namespace",
        "db.user",
        "db.statement",
        "db.query.text",
        "db.operation",
        "db.operation.name",
        "db.response.status_code",
        "net.peer.name",
        "net.peer.port",
        "net.transport",
        "server.address",
        "server.port",
        "network.transport",
        "network.peer.address",
        "network.peer.port",
        "error.type",
        # gRPC (the SpiceDB client).
        "rpc.system",
        "rpc.service",
        "rpc.method",
        "rpc.grpc.status_code",
    }
)

ALLOWED_EXCEPTION_ATTRIBUTES: Final[frozenset[str]] = frozenset(
    {"exception.type", "exception.escaped"}
)

_SQL_TEXT: Final = frozenset({"db.statement", "db.query.text"})
# A quoted SQL literal ('' escapes a quote inside it).
_SQL_LITERAL: Final = re.compile(r"'(?:[^']|'')*'")

# asyncpg gives every SQLSTATE it knows a class of its own with the code on the class, so the
# code can be told from ``exception.type`` alone, without the message.
_SQLSTATE_BY_TYPE: Final[dict[str, str]] = {
    f"{cls.__module__}.{cls.__qualname__}": str(getattr(cls, "sqlstate", ""))
    for cls in vars(asyncpg.exceptions).values()
    if isinstance(cls, type) and isinstance(getattr(cls, "sqlstate", None), str)
}
_GRPC_CODE_NAMES: Final[dict[int, str]] = {code.value[0]: code.name for code in grpc.StatusCode}


def _allowed(
    attributes: Mapping[str, AttributeValue] | None, keys: frozenset[str]
) -> dict[str, AttributeValue]:
    kept: dict[str, AttributeValue] = {}
    for key, value in (attributes or {}).items():
        if key not in keys:
            continue
        if key in _SQL_TEXT and isinstance(value, str):
            value = _SQL_LITERAL.sub("'?'", value)
        kept[key] = value
    return kept


def _exception_type(span: ReadableSpan) -> str | None:
    """The fully qualified class of the last exception recorded on ``span``, if any."""
    for event in reversed(span.events):
        if event.name == "exception" and event.attributes:
            value = event.attributes.get("exception.type")
            if isinstance(value, str):
                return value
    error_type = (span.attributes or {}).get("error.type")
    return error_type if isinstance(error_type, str) else None


def _error_description(span: ReadableSpan) -> str | None:
    """``"<Class> (SQLSTATE <code>)"``, ``"<Class> (gRPC <code>)"``, or the part that is known."""
    qualified = _exception_type(span)
    name = qualified.rsplit(".", 1)[-1] if qualified else None
    code: str | None = None
    if qualified in _SQLSTATE_BY_TYPE:
        code = f"SQLSTATE {_SQLSTATE_BY_TYPE[qualified]}"
    grpc_code = (span.attributes or {}).get("rpc.grpc.status_code")
    if isinstance(grpc_code, int) and grpc_code in _GRPC_CODE_NAMES:
        code = f"gRPC {_GRPC_CODE_NAMES[grpc_code]}"
    if name and code:
        return f"{name} ({code})"
    return name or code


def _status(span: ReadableSpan) -> Status:
    if span.status.status_code is not StatusCode.ERROR:
        return span.status
    return Status(StatusCode.ERROR, _error_description(span))


def _events(events: Sequence[Event]) -> list[Event]:
    scrubbed: list[Event] = []
    for event in events:
        keys = ALLOWED_EXCEPTION_ATTRIBUTES if event.name == "exception" else ALLOWED_ATTRIBUTES
        attributes = _allowed(event.attributes, keys)
        scrubbed.append(Event(event.name, attributes, event.timestamp))
    return scrubbed


def scrub_span(span: ReadableSpan) -> ReadableSpan:
    """A copy of ``span`` with nothing that could carry a row value.

    Ids, timing, kind, parent, links, resource and name are kept; attributes are allow-listed;
    exception events keep only their type; an error status is described by class and code.

    Args:
        span: A finished span from any instrumentation.

    Returns:
        The span to export.
    """
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=_allowed(span.attributes, ALLOWED_ATTRIBUTES),
        events=_events(span.events),
        links=[
            Link(link.context, _allowed(link.attributes, ALLOWED_ATTRIBUTES)) for link in span.links
        ],
        kind=span.kind,
        status=_status(span),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class ScrubbingSpanExporter(SpanExporter):
    """Scrub every span (:func:`scrub_span`), then hand it to the real exporter.

    spicesync wraps both of its exporters (OTLP and the JSON-lines file) in it. An application
    that traces its own calls to the starters should wrap its exporter the same way.
    """

    def __init__(self, exporter: SpanExporter) -> None:
        """Wrap ``exporter``."""
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export scrubbed copies of ``spans``."""
        return self._exporter.export([scrub_span(span) for span in spans])

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the wrapped exporter."""
        return self._exporter.force_flush(timeout_millis)
