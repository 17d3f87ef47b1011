r"""Look for users' emails and names where they must never be: spans, log lines, metrics.

The fault suite and the integration tests read what the processes wrote (the JSON-lines trace
file, the worker's log, the metrics page) and look for every email and name they submitted.
Case is ignored (PostgreSQL quotes ``lower(email)``), and the strings inside JSON lines are
looked at decoded, so an escaped ``Zo\u00eb`` is found as ``Zoë``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from spicesync.models import CreateUserInput

__all__ = ["MIN_SECRET_LENGTH", "Leak", "find_leaks", "searchable"]

# Shorter values (a poison input's "Ada\x07", say) also occur by chance in ids and timestamps.
MIN_SECRET_LENGTH: Final = 6


@dataclass(frozen=True)
class Leak:
    """A user's email or name found in one of the scanned texts.

    Attributes:
        user_id: Whose value it is (the report names the user, never the value).
        field: ``"email"`` or ``"name"``.
        where: The label of the text it was found in.
    """

    user_id: str
    field: str
    where: str


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def searchable(text: str) -> str:
    """``text`` case-folded, with each JSON line replaced by the strings in it, decoded.

    Each distinct string is kept once: spans repeat the same statements and resource
    attributes thousands of times, and a run's whole trace file is searched for every user.
    """
    pieces: dict[str, None] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("{", "[")):
            try:
                pieces.update(dict.fromkeys(_strings(json.loads(stripped))))
                continue
            except ValueError:
                pass
        pieces[line] = None
    return "\n".join(pieces).casefold()


def find_leaks(texts: dict[str, str], users: Iterable[CreateUserInput]) -> list[Leak]:
    """Every user email or name (at least :data:`MIN_SECRET_LENGTH` long) found in ``texts``.

    Args:
        texts: What to search, by a label for the report (e.g. a file name).
        users: The users whose emails and names must not appear.

    Returns:
        One :class:`Leak` per value and text it was found in.
    """
    haystacks = {label: searchable(text) for label, text in texts.items()}
    leaks: list[Leak] = []
    for user in users:
        for field, value in (("email", user.email), ("name", user.name)):
            needle = value.strip().casefold()
            if len(needle) < MIN_SECRET_LENGTH:
                continue
            leaks.extend(
                Leak(user.user_id, field, label)
                for label, haystack in haystacks.items()
                if needle in haystack
            )
    return leaks
