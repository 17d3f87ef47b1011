"""FaultProxy against real echo servers (TCP and Unix socket): forwarding, outage, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chaos.proxy import FaultProxy

MIB = 1024 * 1024


@dataclass
class EchoServer:
    """A real echo server; remembers how each of its connections ended."""

    target: str | tuple[str, int]
    endings: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        how = "eof"
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            how = "reset"
        finally:
            writer.close()
            self.endings.append(how)
            self.ended.set()


@pytest.fixture
async def tcp_echo() -> AsyncIterator[EchoServer]:
    echo = EchoServer(target=("", 0))
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    echo.target = ("127.0.0.1", server.sockets[0].getsockname()[1])
    async with server:
        yield echo


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "e.sock")
    if len(path) < 100:  # sun_path is ~108 bytes and pytest's tmp_path can be deep
        yield path
        return
    short = tempfile.mkdtemp(prefix="fp")
    yield os.path.join(short, "e.sock")
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
async def unix_echo(sock_path: str) -> AsyncIterator[EchoServer]:
    echo = EchoServer(target=sock_path)
    server = await asyncio.start_unix_server(echo.handle, sock_path)
    async with server:
        yield echo


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 2)


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: bytes) -> bytes:
    writer.write(msg)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(msg)), 2)


async def round_trip_mib(proxy: FaultProxy) -> None:
    """Send 1 MiB, half-close, and read the echo until EOF (exercises backpressure too)."""
    payload = os.urandom(MIB)
    reader, writer = await connect(proxy)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    _, echoed = await asyncio.wait_for(asyncio.gather(send(), reader.read()), 2)
    writer.close()
    assert echoed == payload


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_tcp_round_trip_small_and_one_mib(tcp_echo: EchoServer) -> None:
    async with FaultProxy(tcp_echo.target) as proxy:
        assert proxy.address == f"127.0.0.1:{proxy.port}"
        reader, writer = await connect(proxy)
        assert await ping(reader, writer, b"hello") == b"hello"
        writer.close()
        await round_trip_mib(proxy)
        assert proxy.connections_accepted == 2
        assert proxy.connections_aborted == 0


async def test_unix_socket_round_trip(unix_echo: EchoServer) -> None:
    async with FaultProxy(unix_echo.target) as proxy:
        reader, writer = await connect(proxy)
        assert await ping(reader, writer, b"SELECT 1") == b"SELECT 1"
        writer.close()
        await round_trip_mib(proxy)
        assert proxy.connections_accepted == 2


async def test_half_close_lets_the_server_finish_answering(tcp_echo: EchoServer) -> None:
    async with FaultProxy(tcp_echo.target) as proxy:
        reader, writer = await connect(proxy)
        writer.write(b"last words")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 2) == b"last words"
        writer.close()
        await asyncio.wait_for(tcp_echo.ended.wait(), 2)
        assert tcp_echo.endings == ["eof"]
        # Both sides finished cleanly, so the proxy dropped the link without an outage.
        await asyncio.sleep(0.05)
        assert proxy.live_connections == 0
        assert proxy.connections_aborted == 0


async def test_refuse_resets_live_connections_and_refuses_new_ones(tcp_echo: EchoServer) -> None:
    async with FaultProxy(tcp_echo.target) as proxy:
        port = proxy.port
        reader, writer = await connect(proxy)
        assert await ping(reader, writer, b"before") == b"before"

        await proxy.refuse()
        await proxy.refuse()  # idempotent

        assert not proxy.listening
        assert proxy.connections_accepted == 1
        assert proxy.connections_aborted == 1
        assert proxy.live_connections == 0
        # SO_LINGER 0 turns the abort into a real RST, not an orderly FIN.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 2)
        writer.close()
        # The server side lost its peer too.
        await asyncio.wait_for(tcp_echo.ended.wait(), 2)
        assert len(tcp_echo.endings) == 1
        with pytest.raises(ConnectionRefusedError):
            await connect(proxy)

        await proxy.restore()
        await proxy.restore()  # idempotent

        assert proxy.listening
        assert proxy.port == port
        reader, writer = await connect(proxy)
        assert await ping(reader, writer, b"after") == b"after"
        writer.close()
        assert proxy.connections_accepted == 2
        assert proxy.connections_aborted == 1


async def test_refuse_on_unix_target_drops_client(unix_echo: EchoServer) -> None:
    async with FaultProxy(unix_echo.target) as proxy:
        readers = [await connect(proxy) for _ in range(3)]
        for i, (r, w) in enumerate(readers):
            assert await ping(r, w, b"%d" % i) == b"%d" % i
        await proxy.refuse()
        for r, w in readers:
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(r.read(1), 2) == b""
            w.close()
        assert proxy.connections_aborted == 3
        await proxy.restore()
        r, w = await connect(proxy)
        assert await ping(r, w, b"back") == b"back"
        w.close()


async def test_repeated_outages_keep_the_same_port(tcp_echo: EchoServer) -> None:
    proxy = FaultProxy(tcp_echo.target, listen_port=unused_port())
    port = proxy.port  # known before start when given
    await proxy.start()
    try:
        for _ in range(3):
            r, w = await connect(proxy)
            assert await ping(r, w, b"x") == b"x"
            await proxy.refuse()
            w.close()
            await proxy.restore()
            assert proxy.port == port
        assert proxy.connections_accepted == 3
        assert proxy.connections_aborted == 3
    finally:
        await proxy.close()


async def test_unreachable_target_drops_the_client() -> None:
    async with FaultProxy(("127.0.0.1", unused_port())) as proxy:
        reader, writer = await connect(proxy)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(1), 2) == b""
        writer.close()
        assert proxy.connections_accepted == 1
        assert proxy.upstream_failures == 1
        assert proxy.connections_aborted == 0


async def test_close_is_final_and_port_is_unknown_before_start(tcp_echo: EchoServer) -> None:
    proxy = FaultProxy(tcp_echo.target)
    with pytest.raises(RuntimeError):
        _ = proxy.port
    async with proxy:
        reader, writer = await connect(proxy)
        assert await ping(reader, writer, b"x") == b"x"
    assert not proxy.listening
    assert proxy.connections_aborted == 1
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy)
    with pytest.raises(RuntimeError):
        await proxy.restore()
    writer.close()
