"""Checks for command-line arguments: a bad one is one line naming it, and exit status 2.

Each check is an ``argparse`` ``type=``: argparse calls it while parsing and reports what it
raises as ``argument --name: <reason>``. Bounds come from :mod:`spicesync.limits`, the same
constants the models' fields use, so the command line and the models cannot disagree. Nothing
heavy is imported here: ``--help`` must stay fast.
"""

from __future__ import annotations

import argparse
import math
import uuid
from collections.abc import Callable
from typing import NoReturn
from urllib.parse import urlsplit

__all__ = [
    "OneLineErrors",
    "duration",
    "followed_user_id",
    "integer",
    "nats_url",
    "number",
    "origin",
    "port",
    "user_id",
]


class OneLineErrors(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: <message>`` and a pointer to ``--help``, then exit with status 2."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _figure(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high`` (inclusive; no upper bound when ``None``)."""
    bounds = f"from {low} to {_figure(high)}" if high is not None else f"at least {low}"

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number ({bounds}), got {text!r}"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return check


def number(
    low: float, high: float | None = None, *, low_included: bool = True
) -> Callable[[str], float]:
    """A finite number above ``low`` (or equal to it, when ``low_included``), at most ``high``."""
    above = f"at least {_figure(low)}" if low_included else f"greater than {_figure(low)}"
    bounds = above if high is None else f"{above} and at most {_figure(high)}"

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a number ({bounds}), got {text!r}")
        too_low = value < low or (value == low and not low_included)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return check


def duration(text: str) -> str:
    """A duration such as ``30s``, ``5m``, ``2h`` or ``1d``; kept as typed (it is shown back)."""
    from starters.stuck import parse_duration  # the SDK comes with it: only once parsing

    try:
        parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 30s, 5m, 2h, 1d)"
        ) from None
    return text


def user_id(text: str) -> str:
    """A user's UUID, returned in its canonical (lower-case) form."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a user's UUID, got {text!r}") from None


def followed_user_id(text: str) -> str:
    """A followed user's id (follow mode): 1-128 letters, digits and ``/_|-=+``."""
    from spicesync.mapping import valid_user_id  # pydantic comes with it: only once parsing

    if not valid_user_id(text):
        raise argparse.ArgumentTypeError(
            f"must be 1-128 letters, digits and /_|-=+ (the id column's text), got {text!r}"
        )
    return text


def port(text: str) -> int:
    """A TCP port (0: any free one)."""
    return integer(0, 65535)(text)


def origin(text: str) -> str:
    """A web origin, ``http(s)://host[:port]``, as a browser sends it in CORS requests."""
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise argparse.ArgumentTypeError(
            f"must be an origin like http://localhost:8233, got {text!r}"
        )
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"an origin has no query or fragment, got {text!r}")
    return f"{parts.scheme}://{parts.netloc}"


def nats_url(text: str) -> str:
    """A NATS server URL, ``nats://host:port`` (or ``tls://``, ``ws://``, ``wss://``)."""
    parts = urlsplit(text)
    if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"must be a NATS URL like nats://127.0.0.1:4222, got {text!r}"
        )
    return text
