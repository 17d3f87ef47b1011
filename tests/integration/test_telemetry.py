"""One user creation is one trace: start call → workflow → activities → SQL and SpiceDB calls."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.testing import WorkflowEnvironment

from spicesync.codec import EncryptionCodec, encrypted_data_converter
from spicesync.stack.processes import free_port
from spicesync.telemetry import instrument_libraries, metrics_runtime
from starters.user_events import create_user
from tests.conftest import SpiceDBServer
from tests.integration.conftest import new_event, worker_settings
from workers.worker import build_worker, open_resources

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    instrument_libraries()
    yield exporter


async def traced_client(
    env: WorkflowEnvironment, codec: EncryptionCodec, **extra: object
) -> Client:
    return await Client.connect(
        env.client.service_client.config.target_host,
        namespace=env.client.namespace,
        data_converter=encrypted_data_converter(codec),
        interceptors=[TracingInterceptor()],
        **extra,  # type: ignore[arg-type]
    )


def tree(all_spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> list[str]:
    """Names in the root's trace, indented by depth (parents before children)."""
    in_trace = [s for s in all_spans if s.context.trace_id == root.context.trace_id]
    children: dict[int | None, list[ReadableSpan]] = {}
    for s in in_trace:
        children.setdefault(s.parent.span_id if s.parent else None, []).append(s)
    lines: list[str] = []

    def walk(span: ReadableSpan, depth: int) -> None:
        lines.append("  " * depth + span.name)
        for child in sorted(
            children.get(span.context.span_id, []), key=lambda s: s.start_time or 0
        ):
            walk(child, depth + 1)

    walk(root, 0)
    return lines


async def test_span_tree_of_one_user_creation(
    spans: InMemorySpanExporter,
    temporal_env: WorkflowEnvironment,
    test_codec: EncryptionCodec,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    spicedb_server: SpiceDBServer,
) -> None:
    client = await traced_client(temporal_env, test_codec)
    user = new_event()
    async with (
        open_resources(worker_settings(database_url, spicedb_server)) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        spans.clear()
        await create_user(user, client=client, task_queue=task_queue)
    finished = spans.get_finished_spans()
    roots = [s for s in finished if s.parent is None and "UserSyncWorkflow" in s.name]
    assert len(roots) == 1, [s.name for s in finished if s.parent is None]
    lines = tree(finished, roots[0])
    text = "\n".join(lines)
    for expected in (
        "RunWorkflow:UserSyncWorkflow",
        "HandleUpdate:submit",
        "RunActivity:insert_created_row",
        "RunActivity:write_memberships",
        "/authzed.api.v1.PermissionsService/WriteRelationships",
    ):
        assert expected in text, expected
    # A new user's write is conditional on SpiceDB holding nothing of the user, checked by the
    # write's own preconditions: nothing is read.
    assert "/authzed.api.v1.PermissionsService/ReadRelationships" not in text
    # SQL spans hang under the activities that ran them.
    sql = [line for line in lines if line.strip().startswith(("INSERT", "UPDATE", "SELECT"))]
    assert sql and all(line.startswith("      ") for line in sql)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_metrics_endpoint_has_sdk_and_spicesync_metrics(
    temporal_env: WorkflowEnvironment,
    test_codec: EncryptionCodec,
    task_queue: str,
    database_url: str,
    app_db: asyncpg.Pool,
    spicedb_server: SpiceDBServer,
) -> None:
    port = free_port()
    client = await traced_client(
        temporal_env, test_codec, runtime=metrics_runtime(f"127.0.0.1:{port}")
    )
    async with (
        open_resources(worker_settings(database_url, spicedb_server)) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        await create_user(new_event(), client=client, task_queue=task_queue)
        body = await asyncio.to_thread(_scrape, f"http://127.0.0.1:{port}/metrics")
    assert "spicesync_time_to_permission" in body
    assert (
        "temporal_activity_execution_latency" in body
        or "temporal_workflow_task_execution_latency" in body
    )
