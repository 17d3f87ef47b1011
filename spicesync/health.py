"""A small HTTP health endpoint for spicesync's long-running processes: ``/livez``, ``/readyz``.

``/livez`` answers 200 while the process's event loop runs (and its liveness checks, if any,
pass): a process that stops answering it is hung and should be restarted. ``/readyz`` answers
200 when every readiness check passes (for a worker: Temporal, PostgreSQL and SpiceDB answer),
503 naming the failing ones otherwise, and 503 ``draining`` once the process is shutting down.
Each check is one cheap call run concurrently with the others under a short timeout, so a probe
answers within that timeout even when a store hangs.

The server is plain asyncio (HTTP/1.0-style: one request per connection, ``GET``/``HEAD``
only): a probe needs nothing more, and it adds no dependency. A response carries check names and
error class names only, never an address, a key or a message from a store. Any process builds
one from named async checks (:func:`temporal_check`, :func:`postgres_check`,
:func:`spicedb_check`, or its own) and runs it beside its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType

import asyncpg
import grpc
from authzed.api.v1 import ReadSchemaRequest
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from spicesync.spicedb import SpiceDBClient

__all__ = [
    "HEALTH_CHECK_TIMEOUT_SECONDS",
    "HealthCheck",
    "HealthServer",
    "parse_address",
    "postgres_check",
    "spicedb_check",
    "temporal_check",
]

log = logging.getLogger("spicesync.health")

# Short: a probe must answer well inside a Kubernetes probe's timeoutSeconds (deploy uses 5 s)
# even when a store hangs, and a hung store is what "not ready" means.
HEALTH_CHECK_TIMEOUT_SECONDS = 2.0
# A probe's request is one line and a few headers; anything larger or slower is not a probe.
_MAX_REQUEST_BYTES = 8 * 1024
_READ_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class HealthCheck:
    """One named check: ``probe`` returns when healthy and raises (or hangs) when not."""

    name: str
    probe: Callable[[], Awaitable[object]]


def temporal_check(client: Client, timeout: float = HEALTH_CHECK_TIMEOUT_SECONDS) -> HealthCheck:
    """Temporal's frontend answers ``GetSystemInfo`` (the call the SDK makes to connect).

    Args:
        client: The process's connected client.
        timeout: The call's deadline in seconds.
    """

    async def probe() -> None:
        await client.workflow_service.get_system_info(
            GetSystemInfoRequest(), timeout=timedelta(seconds=timeout)
        )

    return HealthCheck("temporal", probe)


def postgres_check(
    pool: asyncpg.Pool, timeout: float = HEALTH_CHECK_TIMEOUT_SECONDS
) -> HealthCheck:
    """PostgreSQL answers ``SELECT 1`` on a connection of the process's pool.

    A pool whose every connection is busy for longer than ``timeout`` reads as not ready too:
    such a process cannot take more work either.

    Args:
        pool: The process's pool.
        timeout: Seconds to get a connection, and again for the query.
    """

    async def probe() -> None:
        async with pool.acquire(timeout=timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=timeout)

    return HealthCheck("postgres", probe)


def spicedb_check(
    client: SpiceDBClient, timeout: float = HEALTH_CHECK_TIMEOUT_SECONDS
) -> HealthCheck:
    """SpiceDB answers ``ReadSchema`` with the process's preshared key.

    ``NOT_FOUND`` (no schema written yet) still proves SpiceDB reachable and the key accepted;
    the worker reports a missing schema in its log at start.

    Args:
        client: The process's SpiceDB client.
        timeout: The call's deadline in seconds.
    """

    async def probe() -> None:
        try:
            await client.ReadSchema(ReadSchemaRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise

    return HealthCheck("spicedb", probe)


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:9465`` for IPv6) into host and port.

    Raises:
        ValueError: No port, or not a number.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


class HealthServer:
    """Serve ``/livez`` and ``/readyz`` for one process.

    Use as an async context manager (or :meth:`start` / :meth:`close`); call
    :meth:`set_draining` when the process begins to shut down.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Sequence[HealthCheck],
        live: Sequence[HealthCheck] = (),
        timeout: float = HEALTH_CHECK_TIMEOUT_SECONDS,
    ) -> None:
        """Prepare the server; nothing listens until :meth:`start`.

        Args:
            host: The interface to listen on (``127.0.0.1`` locally; ``0.0.0.0`` in a pod, so
                the kubelet reaches it).
            port: The port; 0 picks a free one (see :attr:`port`).
            ready: Checks that must all pass for ``/readyz``.
            live: Checks that must all pass for ``/livez`` (none: the loop answering is enough).
            timeout: Each check's deadline in seconds, on top of the check's own.
        """
        self._host = host
        self._port = port
        self._ready = list(ready)
        self._live = list(live)
        self._timeout = timeout
        self._draining = False
        self._server: asyncio.Server | None = None
        self._failing: set[str] = set()

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, when started with 0)."""
        if self._server is None:
            raise RuntimeError("HealthServer has not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen.

        Raises:
            OSError: The address cannot be bound (in use, say).
        """
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=_MAX_REQUEST_BYTES
        )

    def set_draining(self) -> None:
        """From now on ``/readyz`` answers 503 ``draining``; ``/livez`` keeps answering."""
        self._draining = True

    async def close(self) -> None:
        """Stop listening and wait for requests being answered."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def report(self, checks: Sequence[HealthCheck]) -> dict[str, str]:
        """Run ``checks`` concurrently; ``{name: "ok" | "failed: <ErrorClass>"}``."""
        results = await asyncio.gather(*(self._run(check) for check in checks))
        return dict(zip((check.name for check in checks), results, strict=True))

    async def _run(self, check: HealthCheck) -> str:
        try:
            await asyncio.wait_for(check.probe(), self._timeout)
        except Exception as err:
            outcome = f"failed: {type(err).__name__}"
            if check.name not in self._failing:  # log changes, not every probe
                self._failing.add(check.name)
                log.warning("health check %s %s", check.name, outcome)
            return outcome
        if check.name in self._failing:
            self._failing.discard(check.name)
            log.info("health check %s ok again", check.name)
        return "ok"

    async def _answer(self, path: str) -> tuple[int, dict[str, object]]:
        if path == "/livez":
            checks = await self.report(self._live)
            ok = all(result == "ok" for result in checks.values())
            return (200 if ok else 503), {"status": "live" if ok else "unhealthy", "checks": checks}
        if path == "/readyz":
            if self._draining:
                return 503, {"status": "draining", "checks": {}}
            checks = await self.report(self._ready)
            ok = all(result == "ok" for result in checks.values())
            return (200 if ok else 503), {"status": "ready" if ok else "unready", "checks": checks}
        return 404, {"status": "not found"}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_SECONDS)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        method, target = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
        status: int
        body: dict[str, object]
        if method not in ("GET", "HEAD"):
            status, body = 405, {"status": "method not allowed"}
        else:
            status, body = await self._answer(target.split("?", 1)[0])
        payload = (json.dumps(body) + "\n").encode()
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Service Unavailable"
        )
        headers = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(OSError):
            writer.write(headers if method == "HEAD" else headers + payload)
            await writer.drain()
        writer.close()
