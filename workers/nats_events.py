"""What a NATS message says about a user: the two formats ``spicesync relay nats`` accepts.

1. The seed's ``user.created``-style event: a JSON object naming the user (``user_id``, or
   ``id``) and, optionally, the row's ``version``; also inside an envelope's ``payload`` or
   ``data`` object (``{"event_type": "user.created", "payload": {...}}``)::

       {"user_id": "acct-42", "version": 3}

2. Debezium's change event, with or without the JSON converter's ``{"schema": .., "payload": ..}``
   wrapper: ``op`` is ``c``/``u``/``r`` (the row is ``after``) or ``d`` (``before``); the user
   id is the mapping's id column of that row::

       {"payload": {"op": "u", "before": {...}, "after": {"account_id": "acct-42", ...},
                    "source": {"lsn": 24023128, ...}}}

A message only says *which* user changed: the user's workflow reads the row as it is now, so
nothing else in it is used, kept or logged. A message that can never name a user raises
:class:`UnusableMessage` with a short reason (a metric label), never the message's content.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from spicesync.mapping import FollowMapping, valid_user_id

__all__ = [
    "REASONS",
    "EventFormat",
    "NatsEvent",
    "PendingEvent",
    "UnusableMessage",
    "coalesce_events",
    "parse_event",
]

# Why a message was terminated: the ``reason`` label of the terminated counter.
REASONS: Final = (
    "not_json",
    "not_an_object",
    "no_user_id",
    "invalid_user_id",
    "invalid_version",
    "unsupported_op",
)
# The seed's field names for the user, in the order they are looked for.
_SEED_ID_FIELDS: Final = ("user_id", "id")
# Debezium's row operations: create, update, read (a snapshot), delete.
_ROW_OPS: Final = frozenset({"c", "u", "r", "d"})
# Envelopes an application's event may sit in (an outbox event's payload, a CloudEvent's data).
_ENVELOPES: Final = ("payload", "data")


class UnusableMessage(ValueError):
    """The message can never become a change; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EventFormat:
    """Where a Debezium row keeps the user id and the version (the mapping's columns).

    Without a mapping (owned mode's table), the id is ``user_id`` or ``id`` and there is no
    version column.
    """

    id_columns: tuple[str, ...] = _SEED_ID_FIELDS
    version_column: str | None = None

    @classmethod
    def of(cls, mapping: FollowMapping | None) -> EventFormat:
        """The format of ``mapping``'s table."""
        if mapping is None:
            return cls()
        return cls(id_columns=(mapping.source.id,), version_column=mapping.source.version)


@dataclass(frozen=True)
class NatsEvent:
    """One user's change as one message tells it."""

    user_id: str
    # The row's version after the change, or, when the mapping names no version column, the
    # source's position (Debezium's ``source.lsn``); ``None`` makes the change always sync.
    version: int | None = None


def parse_event(data: bytes, event_format: EventFormat) -> NatsEvent:
    """Read the user (and version) a message names.

    Args:
        data: The message body.
        event_format: The mapping's id and version columns, for Debezium's rows.

    Returns:
        The change.

    Raises:
        UnusableMessage: The message can never name a user (its reason, never its content).
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise UnusableMessage("not_json") from None
    if not isinstance(document, dict):
        raise UnusableMessage("not_an_object")
    # Debezium's JSON converter with schemas on: the event is the wrapper's payload.
    inner = document.get("payload")
    if isinstance(inner, dict) and _is_debezium(inner):
        document = inner
    if _is_debezium(document):
        return _debezium(document, event_format)
    return _seed(document)


def _is_debezium(document: Mapping[str, Any]) -> bool:
    return "op" in document and ("after" in document or "before" in document)


def _seed(document: Mapping[str, Any]) -> NatsEvent:
    found = _user_id(document, _SEED_ID_FIELDS)
    if found is None:
        inner = next((document[k] for k in _ENVELOPES if isinstance(document.get(k), dict)), None)
        if inner is None:
            raise UnusableMessage("no_user_id")
        return _seed(inner)
    return NatsEvent(found, _version(document.get("version")))


def _debezium(document: Mapping[str, Any], event_format: EventFormat) -> NatsEvent:
    op = document.get("op")
    if op not in _ROW_OPS:
        # "t" (truncate) and "m" (a logical message) name no user; a reconcile covers a
        # truncate.
        raise UnusableMessage("unsupported_op")
    deleted = op == "d"
    row = document.get("before" if deleted else "after")
    if not isinstance(row, dict):
        raise UnusableMessage("no_user_id")
    user_id = _user_id(row, event_format.id_columns)
    if user_id is None:
        raise UnusableMessage("no_user_id")
    if deleted:
        # The row is gone: the delete must sync whatever version was synced before (that
        # version is ``before``'s, and a change not newer than it would be skipped).
        return NatsEvent(user_id, None)
    if event_format.version_column is not None:
        return NatsEvent(user_id, _version(row.get(event_format.version_column)))
    source = document.get("source")
    lsn = source.get("lsn") if isinstance(source, dict) else None
    return NatsEvent(user_id, _version(lsn))


def _user_id(document: Mapping[str, Any], fields: Iterable[str]) -> str | None:
    """The first of ``fields`` present; raises if it is there but not an opaque id."""
    for name in fields:
        value = document.get(name)
        if value is None:
            continue
        # A bigint id column arrives as a number; a bool is no id.
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not valid_user_id(value):
            raise UnusableMessage("invalid_user_id")
        return value
    return None


def _version(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnusableMessage("invalid_version")
    return value


@dataclass(frozen=True)
class PendingEvent:
    """One user's change in a fetched batch, and the stream sequences of its messages."""

    user_id: str
    # The highest version of the messages; ``None`` when one carried none.
    version: int | None
    seqs: tuple[int, ...]


def coalesce_events(events: Iterable[tuple[int, NatsEvent]]) -> list[PendingEvent]:
    """One change per user, in the order of each user's first message.

    Args:
        events: ``(stream sequence, event)`` in delivery order.

    Returns:
        The changes; each keeps the sequences of the messages it stands for.
    """
    seqs: dict[str, list[int]] = {}
    versions: dict[str, list[int | None]] = {}
    for seq, event in events:
        seqs.setdefault(event.user_id, []).append(seq)
        versions.setdefault(event.user_id, []).append(event.version)
    pending = []
    for user_id, user_seqs in seqs.items():
        known = [v for v in versions[user_id] if v is not None]
        version = max(known) if len(known) == len(user_seqs) else None
        pending.append(PendingEvent(user_id, version, tuple(user_seqs)))
    return pending
