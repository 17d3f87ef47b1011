"""Shared fixtures: real engines, started once per session, isolated per test by fresh ids."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from spicesync.codec import EncryptionCodec, encrypted_data_converter, generate_key, parse_keys
from spicesync.constants import SEARCH_ATTRIBUTES, dev_server_dynamic_config
from spicesync.spicedb import SpiceDBClient, connect_spicedb
from spicesync.stack.components import (
    prepare_app_db,
    prepare_spicedb,
    start_embedded_postgres,
    start_spicedb,
    stop_embedded_postgres,
)
from spicesync.stack.processes import free_port, pid_alive, stop_pid, tool_path, wait_for_port


def _binary(name: str) -> str:
    path = tool_path(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed; run the README's test command")
    return path


@pytest.fixture(scope="session")
def test_codec_keys() -> str:
    """``SPICESYNC_ENCRYPTION_KEYS`` for this session (worker processes started by tests)."""
    return f"test:{generate_key()}"


@pytest.fixture(scope="session")
def test_codec(test_codec_keys: str) -> EncryptionCodec:
    """The payload codec the integration tests' client and workers use (a key per session)."""
    return EncryptionCodec(parse_keys(test_codec_keys), "test")


@pytest.fixture(scope="session")
async def temporal_env(test_codec: EncryptionCodec) -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server, with spicesync's search attributes and eager start."""
    extra = [*dev_server_dynamic_config(), "--log-level", "warn"]
    for name, kind in SEARCH_ATTRIBUTES.items():
        extra += ["--search-attribute", f"{name}={kind}"]
    env = await WorkflowEnvironment.start_local(
        # Encrypted like a real deployment: every integration test runs with the codec on.
        data_converter=encrypted_data_converter(test_codec),
        dev_server_existing_path=_binary("temporal"),
        dev_server_extra_args=extra,
        ui=False,
    )
    yield env
    await env.shutdown()


async def _start_time_skipping() -> WorkflowEnvironment:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter,
        test_server_existing_path=_binary("temporal-test-server"),
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                name: IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{kind.upper()}")
                for name, kind in SEARCH_ATTRIBUTES.items()
            },
        )
    )
    return env


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server, for workflow logic with mocked activities."""
    env = await _start_time_skipping()
    yield env
    await env.shutdown()


@pytest.fixture
async def own_time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of the test's own, for tests that move its clock forward.

    Moving a shared server's clock would fire every other test's timers too.
    """
    env = await _start_time_skipping()
    yield env
    await env.shutdown()


@pytest.fixture
def task_queue() -> str:
    """A task queue of this test's own, so no other test's worker picks up its tasks."""
    return f"test-{uuid.uuid4()}"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """``TEST_DATABASE_URL`` when set; otherwise an embedded PostgreSQL for this session."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    data_dir = Path(tempfile.mkdtemp(prefix="spicesync-pg-")) / "data"
    url = start_embedded_postgres(data_dir)
    yield url
    stop_embedded_postgres(data_dir)
    shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture(scope="session")
async def app_db(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated App DB and a pool to read it with."""
    await prepare_app_db(database_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    assert pool is not None
    yield pool
    await pool.close()


@dataclass
class SpiceDBServer:
    """The real SpiceDB engine behind its gRPC host, as a separate process."""

    endpoint: str
    preshared_key: str
    pid: int
    log: Path

    def pause(self) -> None:
        """Freeze the process: calls hang until their deadline, as with a hung server."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused process run again, its data intact."""
        os.kill(self.pid, signal.SIGCONT)

    def client(self, key: str | None = None) -> SpiceDBClient:
        """A fresh client, with the right key unless told otherwise."""
        return connect_spicedb(self.endpoint, key or self.preshared_key)


async def launch_spicedb(port: int | None = None, key: str | None = None) -> SpiceDBServer:
    """Start a SpiceDB engine process with spicesync's schema (on ``port``, or a free one)."""
    port = port or free_port()
    key = key or f"test-{uuid.uuid4().hex}"
    log = Path(tempfile.mkdtemp(prefix="spicesync-spicedb-")) / "spicedb.log"
    pid, _label = start_spicedb(port=port, preshared_key=key, log=log)
    wait_for_port("127.0.0.1", port, pid=pid, timeout=60, log=log)
    server = SpiceDBServer(f"127.0.0.1:{port}", key, pid, log)
    await prepare_spicedb(server.endpoint, key)
    return server


def stop_spicedb(server: SpiceDBServer) -> None:
    """Stop a SpiceDB process started by :func:`launch_spicedb` (paused or not)."""
    if pid_alive(server.pid):
        os.kill(server.pid, signal.SIGCONT)
        stop_pid(server.pid)


@pytest.fixture(scope="session")
async def spicedb_server() -> AsyncIterator[SpiceDBServer]:
    """One SpiceDB engine for the session; tests isolate themselves with fresh object ids."""
    server = await launch_spicedb()
    yield server
    stop_spicedb(server)


@pytest.fixture
async def spicedb(spicedb_server: SpiceDBServer) -> AsyncIterator[SpiceDBClient]:
    """A client for reading SpiceDB state in assertions."""
    client = spicedb_server.client()
    yield client
    await client.close()


@pytest.fixture
async def client(temporal_env: WorkflowEnvironment) -> Client:
    """The dev server's client (pydantic converter)."""
    return temporal_env.client


@pytest.fixture
def patient_local_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give each local try 60 s instead of 1 s, for tests of the healthy local path.

    A try that overruns its budget goes on as a normal activity, as it should on a busy box; a
    test that asserts the local path must not see that happen. ``workflows.steps`` is passed
    through the sandbox, so the workflow sees the patched value.
    """
    from workflows import steps

    monkeypatch.setattr(steps, "_LOCAL_TIMEOUT", timedelta(seconds=60))
