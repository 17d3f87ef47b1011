"""A TCP forwarding proxy that can make PostgreSQL or SpiceDB "unreachable" on demand.

Chaos scenarios point a client (asyncpg pool, SpiceDB gRPC channel) at a :class:`FaultProxy`
instead of the real server, run load through it, then call :meth:`FaultProxy.refuse` to
simulate the server's host disappearing and :meth:`FaultProxy.restore` to bring it back.
The proxy runs on the caller's event loop so the load generator and the fault share one
process and one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from types import TracebackType
from urllib.parse import parse_qs, urlsplit, urlunsplit

__all__ = ["FaultProxy", "postgres_route"]

_HOST = "127.0.0.1"
# One read per 64 KiB keeps bulk transfers (COPY, large result sets) cheap without letting a
# single connection hold a large buffer.
_CHUNK = 64 * 1024
# SO_LINGER on with a zero timeout makes close() send an RST instead of a FIN: a plain
# transport.abort() only discards asyncio's buffer and still closes the socket gracefully,
# which a client would see as an orderly shutdown rather than a crashed host.
_LINGER_RST = struct.pack("ii", 1, 0)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Reset ``writer``'s connection at once, dropping anything still buffered."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Unix sockets have no RST; closing one with unread data already yields ECONNRESET.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class _Link:
    """One proxied connection: the accepted client side and, once connected, the upstream."""

    __slots__ = ("aborted", "client", "upstream")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.aborted = False

    def abort(self) -> bool:
        """Reset both sides; return whether this call did it (so outages are counted once)."""
        if self.aborted:
            return False
        self.aborted = True
        _abort(self.client)
        _abort(self.upstream)
        return True


class FaultProxy:
    """Forward TCP connections from ``127.0.0.1`` to a target, with an on/off outage switch.

    While listening, every accepted connection is paired with a fresh connection to the target
    and bytes are copied both ways. :meth:`refuse` stops listening and resets every live
    connection, so clients see both connection loss and ``ECONNREFUSED`` on reconnect, which
    is what a crashed database host looks like from the client's side. :meth:`restore` listens
    again on the same port, so clients that retry reconnect without reconfiguration.

    Attributes:
        connections_accepted: Client connections accepted over the proxy's lifetime.
        connections_aborted: Live connections reset by :meth:`refuse` (or :meth:`close`).
        upstream_failures: Accepted connections dropped because the target could not be
            reached.

    Example:
        >>> async with FaultProxy(("127.0.0.1", 5432)) as proxy:  # doctest: +SKIP
        ...     dsn = f"postgresql://app@{proxy.address}/app"
        ...     await proxy.refuse()
        ...     await proxy.restore()
    """

    def __init__(self, target: str | tuple[str, int], *, listen_port: int | None = None) -> None:
        """Create a stopped proxy; nothing listens until :meth:`start`.

        Args:
            target: A Unix-socket path (e.g. PostgreSQL's ``/run/dir/.s.PGSQL.5432``) or a
                ``(host, port)`` pair.
            listen_port: The local port to listen on; ``None`` lets the OS pick a free one on
                the first :meth:`start`, which is then reused by every :meth:`restore`.
        """
        self._target = target
        self._port = listen_port
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.connections_accepted = 0
        self.connections_aborted = 0
        self.upstream_failures = 0

    @property
    def port(self) -> int:
        """The local port clients connect to.

        Raises:
            RuntimeError: No ``listen_port`` was given and the proxy has not started yet.
        """
        if self._port is None:
            raise RuntimeError("FaultProxy has no port until start() picks one")
        return self._port

    @property
    def address(self) -> str:
        """``"127.0.0.1:<port>"``, ready for a DSN or a gRPC target."""
        return f"{_HOST}:{self.port}"

    @property
    def listening(self) -> bool:
        """Whether the proxy currently accepts new connections."""
        return self._server is not None

    @property
    def live_connections(self) -> int:
        """Proxied connections currently open (or still connecting upstream)."""
        return len(self._links)

    async def start(self) -> None:
        """Begin listening and forwarding. Does nothing if already listening.

        Raises:
            RuntimeError: The proxy was closed.
            OSError: The port could not be bound.
        """
        if self._closed:
            raise RuntimeError("FaultProxy is closed")
        if self._server is not None:
            return
        # reuse_address lets restore() rebind the port immediately even while connections
        # from before the outage linger in the kernel.
        self._server = await asyncio.start_server(
            self._accept, _HOST, self._port or 0, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Start the outage: refuse new connections and reset every live one.

        Both sides of each live connection are reset, so the client sees its connection
        drop and the server sees its peer vanish. Does nothing if already refusing.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            if link.abort():
                self.connections_aborted += 1
        # Handlers still waiting on an upstream connect would otherwise finish it after the
        # outage began; cancelling them is safe because they are this proxy's own tasks.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        """End the outage: listen again on the same port. Does nothing if already listening.

        Raises:
            RuntimeError: The proxy was closed.
            OSError: The port was taken by something else in the meantime.
        """
        await self.start()

    async def close(self) -> None:
        """Refuse, reset everything and release the port for good."""
        self._closed = True
        await self.refuse()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio's own handler task logs a cancelled
        # coroutine as an error, and refuse() needs to cancel handlers freely.
        link = _Link(writer)
        self.connections_accepted += 1
        if self._server is None:
            # Accepted by the kernel just before refuse() closed the listener.
            link.abort()
            self.connections_aborted += 1
            return
        self._links.add(link)
        task = asyncio.get_running_loop().create_task(self._serve(link, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        try:
            try:
                if isinstance(self._target, str):
                    up_reader, link.upstream = await asyncio.open_unix_connection(self._target)
                else:
                    host, port = self._target
                    up_reader, link.upstream = await asyncio.open_connection(host, port)
            except OSError:
                # The target is down: reset the client so it fails fast like a refused
                # connect, rather than hanging on a connection that can never carry bytes.
                self.upstream_failures += 1
                link.abort()
                return
            await asyncio.gather(
                self._pump(client_reader, link.upstream, link),
                self._pump(up_reader, link.client, link),
            )
        finally:
            self._links.discard(link)
            # Only synchronous closes here: this runs under cancellation from refuse().
            link.client.close()
            if link.upstream is not None:
                link.upstream.close()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                # Backpressure: never read faster than the other side accepts.
                await writer.drain()
            # A clean EOF is passed on as a half-close, since protocols may still answer
            # after the peer has finished sending.
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            # One side failed mid-stream; the other must not keep a dead conversation open.
            link.abort()


def postgres_route(url: str) -> tuple[str | tuple[str, int], Callable[[int], str]]:
    """Where PostgreSQL really listens, and the URL of the same database through a proxy.

    Args:
        url: The database's URL (TCP, or a Unix socket directory in ``?host=``).

    Returns:
        The proxy's target, and a function giving the URL through a proxy on a given port.
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    port = int(query.get("port", [parts.port or 5432])[0])
    socket_dir = query.get("host", [None])[0]
    target: str | tuple[str, int] = (
        f"{socket_dir}/.s.PGSQL.{port}"
        if socket_dir and socket_dir.startswith("/")
        else (parts.hostname or "127.0.0.1", port)
    )
    user = parts.username or "postgres"

    def rewrite(proxy_port: int) -> str:
        return urlunsplit(("postgresql", f"{user}@127.0.0.1:{proxy_port}", parts.path, "", ""))

    return target, rewrite
