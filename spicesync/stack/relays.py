"""The relays running beside a local stack, so that ``spicesync stack status`` lists them.

``stack up`` starts the engines, not the relays: an operator starts ``spicesync relay <feed>``
beside it (as beside a production deployment). A relay whose settings point at a recorded stack
leaves a small file in the stack's state folder while it runs (its pid and endpoints, nothing
secret); ``stack status`` lists the ones whose process is alive, probes their ``/readyz``, and
removes the files of relays that died without removing their own (SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from spicesync.private_files import private_dir, write_private
from spicesync.stack.processes import pid_alive

__all__ = ["RelayRecord", "listed_relay", "relay_health", "running_relays"]

_FOLDER: Final = "relays"
_PROBE_TIMEOUT_SECONDS: Final = 5.0


@dataclass(frozen=True)
class RelayRecord:
    """One running relay: its feed, process and endpoints."""

    feed: str
    pid: int
    health_address: str | None = None
    metrics_address: str | None = None


@contextlib.contextmanager
def listed_relay(state_dir: Path, record: RelayRecord) -> Iterator[None]:
    """List ``record`` in the stack's state folder while the block runs.

    Nothing is written when no stack is recorded there (a relay in production, say).

    Args:
        state_dir: The stack's state folder (``SPICESYNC_STATE_DIR``).
        record: What ``stack status`` shows of this relay.
    """
    if not (state_dir / "stack.json").exists():
        yield
        return
    folder = private_dir(state_dir / _FOLDER)
    path = folder / f"{record.feed}-{record.pid}.json"
    write_private(path, json.dumps(asdict(record)))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def running_relays(state_dir: Path) -> list[RelayRecord]:
    """The relays listed in ``state_dir`` whose process is alive; the others' files are removed."""
    folder = state_dir / _FOLDER
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = RelayRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # being written or removed right now
        if pid_alive(record.pid) and record.pid != os.getpid():
            records.append(record)
        else:
            path.unlink(missing_ok=True)
    return records


async def relay_health(record: RelayRecord) -> str:
    """``healthy``, ``not ready (...)``, ``running`` (no health endpoint) or ``down (...)``."""
    if not record.health_address:
        return "running"
    host, _, port = record.health_address.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host or "127.0.0.1", int(port)), _PROBE_TIMEOUT_SECONDS
        )
        try:
            writer.write(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), _PROBE_TIMEOUT_SECONDS)
        finally:
            writer.close()
    except (OSError, TimeoutError, ValueError) as err:
        return f"down ({type(err).__name__})"
    status_line, _, rest = answer.partition(b"\r\n")
    if status_line.split()[1:2] == [b"200"]:
        return "healthy"
    try:
        body = json.loads(rest.partition(b"\r\n\r\n")[2])
        failing = [name for name, result in body["checks"].items() if result != "ok"]
        why = ", ".join(failing) or str(body["status"])
    except (ValueError, KeyError, AttributeError):
        why = status_line.decode("latin-1")
    return f"not ready ({why})"
