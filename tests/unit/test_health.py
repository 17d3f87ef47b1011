"""spicesync/health.py on its own: what /livez and /readyz answer for passing, failing, hanging
checks and while draining (stand-in checks; the worker's real ones are tested in
tests/integration/test_worker_lifecycle.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from spicesync.health import HealthCheck, HealthServer, parse_address


async def _ok() -> None:
    return None


async def _refused() -> None:
    raise ConnectionRefusedError("secret-host:5432 refused")


async def _hangs() -> None:
    await asyncio.Event().wait()


async def _request(port: int, line: str) -> tuple[int, dict[str, object] | None, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{line}\r\nHost: x\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), (json.loads(body) if body else None), head


async def test_readyz_names_the_failing_and_the_hung_check_and_livez_stays_up() -> None:
    checks = [HealthCheck("a", _ok), HealthCheck("b", _refused), HealthCheck("c", _hangs)]
    async with HealthServer("127.0.0.1", 0, ready=checks, timeout=0.2) as server:
        status, body, head = await _request(server.port, "GET /readyz HTTP/1.1")
        assert status == 503 and "Content-Type: application/json" in head
        assert body == {
            "status": "unready",
            "checks": {
                "a": "ok",
                "b": "failed: ConnectionRefusedError",
                "c": "failed: TimeoutError",
            },
        }
        assert "secret-host" not in json.dumps(body)  # class names only, never a message
        assert (await _request(server.port, "GET /livez HTTP/1.1"))[:2] == (
            200,
            {"status": "live", "checks": {}},
        )


async def test_ready_when_all_pass_then_draining() -> None:
    async with HealthServer("127.0.0.1", 0, ready=[HealthCheck("a", _ok)]) as server:
        assert (await _request(server.port, "GET /readyz?verbose=1 HTTP/1.1"))[:2] == (
            200,
            {"status": "ready", "checks": {"a": "ok"}},
        )
        status, body, _ = await _request(server.port, "HEAD /readyz HTTP/1.1")
        assert (status, body) == (200, None)
        server.set_draining()
        assert (await _request(server.port, "GET /readyz HTTP/1.1"))[:2] == (
            503,
            {"status": "draining", "checks": {}},
        )
        assert (await _request(server.port, "GET /livez HTTP/1.1"))[0] == 200


async def test_other_paths_methods_and_garbage() -> None:
    live = [HealthCheck("loop", _refused)]
    async with HealthServer("127.0.0.1", 0, ready=[], live=live) as server:
        assert (await _request(server.port, "GET /livez HTTP/1.1"))[0] == 503
        assert (await _request(server.port, "GET /metrics HTTP/1.1"))[0] == 404
        assert (await _request(server.port, "POST /readyz HTTP/1.1"))[0] == 405
        assert (await _request(server.port, "nonsense"))[0] == 405


def test_parse_address() -> None:
    assert parse_address("0.0.0.0:9465") == ("0.0.0.0", 9465)
    assert parse_address("[::1]:9465") == ("::1", 9465)
    for bad in ("9465", ":9465", "host:", "host:http"):
        with pytest.raises(ValueError):
            parse_address(bad)
