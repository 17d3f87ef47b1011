"""free_port(): the ports the tests, the bench and the fault suite hand to servers they start."""

from __future__ import annotations

import socket

import pytest

from spicesync.stack import processes
from spicesync.stack.processes import free_port


def test_ports_come_from_outside_the_kernels_ephemeral_range() -> None:
    # An ephemeral port can be taken by any outgoing connection before the server binds it.
    low, high = processes._ephemeral_range()
    ports = [free_port() for _ in range(50)]
    # (A kernel whose range leaves no room outside it is the third test's case.)
    assert not processes._port_pool() or all(not low <= port <= high for port in ports), ports
    assert len(set(ports)) == len(ports), "a port was handed out twice"


def test_a_port_something_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]  # free again once the probe closes
        picks = iter([taken, taken, free])
        monkeypatch.setattr(processes.random, "choice", lambda pool: next(picks))
        monkeypatch.setattr(processes, "_handed_out", set())
        assert free_port() == free


def test_without_room_outside_the_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "_ephemeral_range", lambda: (1024, 65535))
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # it was free
    assert 1024 <= port <= 65535
