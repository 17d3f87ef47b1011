"""Progress on stderr while a command waits, so a wait is never silent.

stdout stays for the command's result (one JSON object, a report), so scripts can read it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["note", "show", "waiting"]

T = TypeVar("T")


def note(line: str) -> None:
    """One line of progress on stderr."""
    print(line, file=sys.stderr, flush=True)


def show(line: str) -> None:
    """A progress line rewritten in place on a terminal; a line per update otherwise."""
    end = "\r" if sys.stderr.isatty() else "\n"
    print(line.ljust(100), end=end, file=sys.stderr, flush=True)


async def waiting(call: Awaitable[T], describe: Callable[[float], str], *, every: float = 3.0) -> T:
    """Await ``call``; every ``every`` seconds it is still running, note ``describe(elapsed)``.

    A call that answers within the first interval prints nothing.
    """
    task = asyncio.ensure_future(call)
    began = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            note(describe(time.monotonic() - began))
    finally:
        task.cancel()  # a no-op once it is done; stops it when the wait itself is cancelled
