"""Tracing and metrics.

One trace from the app's start call through the workflow, each activity, each PostgreSQL query
and each SpiceDB call; SDK and spicesync metrics on a Prometheus endpoint.

Built from what the ecosystem already has: temporalio's ``TracingInterceptor``, the asyncpg and
gRPC instrumentations, the OTLP exporter, and the Temporal runtime's own Prometheus exporter
(which also carries the workflow's custom metrics).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from spicesync.span_scrubbing import ScrubbingSpanExporter

__all__ = ["configure_tracing", "instrument_libraries", "metrics_runtime"]

_instrumented = False


def instrument_libraries() -> None:
    """Trace every asyncpg query and every gRPC (SpiceDB) call made from now on (idempotent)."""
    global _instrumented
    if not _instrumented:
        # Never the statements' parameters: they are the rows' values (emails, names).
        AsyncPGInstrumentor(capture_parameters=False).instrument()  # type: ignore[no-untyped-call]
        GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]
        _instrumented = True


def configure_tracing(service_name: str, trace_file: Path | None) -> TracerProvider:
    """Install the global tracer provider and instrument the libraries.

    Spans go to OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific variable) is
    set, to ``trace_file`` as JSON lines otherwise, and nowhere without either (trace context
    still propagates). Every exported span is scrubbed first
    (:class:`~spicesync.span_scrubbing.ScrubbingSpanExporter`): no row value is exported.

    Args:
        service_name: The ``service.name`` resource attribute.
        trace_file: Where spans go when no OTLP endpoint is configured; none: not exported.

    Returns:
        The provider (shut it down to flush).
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter: SpanExporter | None = None
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        exporter = OTLPSpanExporter()
    elif trace_file is not None:
        trace_file.parent.mkdir(parents=True, exist_ok=True)
        out: IO[str] = trace_file.open("a", encoding="utf-8")
        exporter = ConsoleSpanExporter(
            out=out, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(ScrubbingSpanExporter(exporter)))
    trace.set_tracer_provider(provider)
    instrument_libraries()
    return provider


def metrics_runtime(bind_address: str) -> Runtime:
    """A Temporal runtime exporting SDK and workflow/activity metrics for Prometheus.

    Args:
        bind_address: ``host:port`` of the ``/metrics`` endpoint.
    """
    return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=bind_address)))
