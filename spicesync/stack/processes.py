"""Start, probe and stop the stack's background processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "free_port",
    "pid_alive",
    "port_open",
    "spawn",
    "stop_pid",
    "stop_process",
    "tool_path",
    "wait_for_port",
]


def tool_path(name: str) -> str | None:
    """Find a console script, preferring the one installed next to this interpreter."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def spawn(cmd: list[str], *, log: Path, env: dict[str, str] | None = None) -> int:
    """Start ``cmd`` detached from this process (its own session), output appended to ``log``.

    Returns:
        The child's pid.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return proc.pid


async def stop_process(process: asyncio.subprocess.Process, *, timeout: float = 15.0) -> None:
    """SIGTERM an asyncio child (it drains), SIGKILL after ``timeout`` seconds; wait for it."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` names a live (non-zombie) process."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs (macOS): kill(0) is all we have
    return state != "Z"


def stop_pid(pid: int, *, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps the child if it is ours."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def port_open(host: str, port: int) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, *, pid: int | None, timeout: float, log: Path) -> None:
    """Wait until ``host:port`` accepts connections.

    Raises:
        RuntimeError: If the process died or the port stayed closed; names the log file.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if pid is not None and not pid_alive(pid):
            raise RuntimeError(f"process {pid} exited during start-up; see {log}")
        time.sleep(0.1)
    raise RuntimeError(f"{host}:{port} not ready after {timeout:.0f}s; see {log}")


# Ports handed out by this process, so two calls never return the same one.
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _port_pool() -> range:
    """Where free ports are picked: below the kernel's ephemeral range when there is room.

    A port the kernel hands out for bind(0) is in the ephemeral range, so any outgoing
    connection may take it between the moment it is picked and the moment a server binds it;
    on a busy box that happened (a SpiceDB port taken by a client's socket). Ports outside
    that range are only ever taken by someone binding them on purpose.
    """
    low, high = _ephemeral_range()
    if low - 20000 >= 1000:
        return range(20000, low)
    if 65535 - high >= 1000:
        return range(high + 1, 65536)
    return range(0)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, outside the kernel's ephemeral range if it can.

    Returns:
        A port nothing listens on, not returned before by this process.
    """
    pool = _port_pool()
    for _ in range(200):
        if not pool:
            break
        port = random.choice(pool)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed_out.add(port)
    return port
