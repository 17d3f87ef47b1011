"""A decoder of PostgreSQL's ``pgoutput`` logical replication messages (protocol version 1).

PostgreSQL decodes its WAL itself (the built-in ``pgoutput`` plugin, which filters by
publication); the CDC relay reads the messages through ``pg_logical_slot_peek_binary_changes``
and needs only a handful of them: Begin, Commit, Relation, Insert, Update, Delete and Truncate
(https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html). Type and
Origin messages are skipped. Column values arrive in PostgreSQL's text form, which is exactly
the form a followed user's id takes everywhere else (docs/follow-mode.md), so nothing is parsed
beyond the bytes.

Pure: bytes in, dataclasses out. Values are kept only for the columns a caller asks for; the
relay asks for the id and version columns, never a column that may hold personal data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = [
    "Begin",
    "Commit",
    "DecodeError",
    "Decoder",
    "Message",
    "Relation",
    "RowChange",
    "Truncate",
    "format_lsn",
]

# pgoutput's timestamps count microseconds from PostgreSQL's epoch.
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_INT8: Final = struct.Struct("!b")
_INT16: Final = struct.Struct("!h")
_INT32: Final = struct.Struct("!i")
_UINT32: Final = struct.Struct("!I")
_INT64: Final = struct.Struct("!q")
_UINT64: Final = struct.Struct("!Q")


class DecodeError(ValueError):
    """A message is not what protocol version 1 of pgoutput sends (or names an unknown table)."""


def format_lsn(lsn: int) -> str:
    """``lsn`` as PostgreSQL writes it (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class Begin:
    """A transaction starts; its changes follow, then its :class:`Commit`."""

    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    """The transaction ended; ``end_lsn`` is where the next one's WAL starts."""

    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True)
class Relation:
    """A table's layout, sent before the first change of it in a decoding session."""

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class RowChange:
    """An INSERT, UPDATE or DELETE of one row: the asked-for columns' text values.

    ``new`` is the row after the change (``None`` for a delete); ``old`` the key (or the whole
    row with REPLICA IDENTITY FULL) before it, sent for a delete and for an update that changed
    the key; otherwise ``None``. A NULL or an unchanged TOASTed value is absent from the dict.
    """

    kind: str  # "insert", "update", "delete"
    relation: Relation
    new: dict[str, str] | None
    old: dict[str, str] | None


@dataclass(frozen=True)
class Truncate:
    """``TRUNCATE`` of the listed tables."""

    relations: tuple[Relation, ...]


Message = Begin | Commit | Relation | RowChange | Truncate


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, size: int) -> bytes:
        end = self._at + size
        if end > len(self._data):
            raise DecodeError("message ends early")
        chunk = self._data[self._at : end]
        self._at = end
        return chunk

    def unpack(self, shape: struct.Struct) -> int:
        value: int = shape.unpack(self.take(shape.size))[0]
        return value

    def byte(self) -> str:
        return self.take(1).decode("ascii")

    def string(self) -> str:
        end = self._data.find(b"\0", self._at)
        if end < 0:
            raise DecodeError("unterminated string")
        text = self._data[self._at : end].decode("utf-8")
        self._at = end + 1
        return text

    def timestamp(self) -> datetime:
        return _PG_EPOCH + timedelta(microseconds=self.unpack(_INT64))


@dataclass
class Decoder:
    """Decodes one slot's messages; remembers each table's layout from its Relation message.

    Args:
        keep: The column names whose values a :class:`RowChange` carries; the others' bytes
            are skipped unread.
    """

    keep: frozenset[str]
    relations: dict[int, Relation] = field(default_factory=dict)

    def decode(self, data: bytes) -> Message | None:
        """One message; ``None`` for one the relay has no use for (Type, Origin, Message).

        Raises:
            DecodeError: Malformed, or a change of a table whose Relation never came.
        """
        reader = _Reader(data)
        tag = reader.byte()
        if tag == "B":
            final_lsn = reader.unpack(_UINT64)
            return Begin(final_lsn, reader.timestamp(), reader.unpack(_UINT32))
        if tag == "C":
            reader.unpack(_INT8)  # flags: unused
            commit_lsn = reader.unpack(_UINT64)
            return Commit(commit_lsn, reader.unpack(_UINT64), reader.timestamp())
        if tag == "R":
            relation = self._relation(reader)
            self.relations[relation.oid] = relation
            return relation
        if tag in "IUD":
            return self._change(tag, reader)
        if tag == "T":
            count = reader.unpack(_INT32)
            reader.unpack(_INT8)  # options (CASCADE, RESTART IDENTITY): irrelevant here
            return Truncate(tuple(self._known(reader.unpack(_UINT32)) for _ in range(count)))
        if tag in "YOM":
            return None
        raise DecodeError(f"unknown pgoutput message {tag!r}")

    def _relation(self, reader: _Reader) -> Relation:
        oid = reader.unpack(_UINT32)
        namespace, name = reader.string(), reader.string()
        identity = chr(reader.unpack(_INT8))
        columns = []
        for _ in range(reader.unpack(_INT16)):
            reader.unpack(_INT8)  # flags: part of the key
            columns.append(reader.string())
            reader.take(8)  # type oid, type modifier
        return Relation(oid, namespace, name, identity, tuple(columns))

    def _known(self, oid: int) -> Relation:
        relation = self.relations.get(oid)
        if relation is None:
            raise DecodeError(f"a change of relation {oid} before its Relation message")
        return relation

    def _change(self, tag: str, reader: _Reader) -> RowChange:
        relation = self._known(reader.unpack(_UINT32))
        new: dict[str, str] | None = None
        old: dict[str, str] | None = None
        part = reader.byte()
        if part in "KO":
            old = self._tuple(relation, reader)
            if tag == "U":
                part = reader.byte()
        if part == "N":
            new = self._tuple(relation, reader)
        elif tag != "D":
            raise DecodeError(f"unexpected tuple tag {part!r}")
        kind = {"I": "insert", "U": "update", "D": "delete"}[tag]
        return RowChange(kind, relation, new, old)

    def _tuple(self, relation: Relation, reader: _Reader) -> dict[str, str]:
        values: dict[str, str] = {}
        count = reader.unpack(_INT16)
        if count > len(relation.columns):
            raise DecodeError(f"a tuple of {count} columns for a table of {len(relation.columns)}")
        for index in range(count):
            kind = reader.byte()
            if kind in "nu":  # NULL, unchanged TOAST value
                continue
            if kind not in "tb":
                raise DecodeError(f"unknown column kind {kind!r}")
            raw = reader.take(reader.unpack(_INT32))
            name = relation.columns[index]
            if name in self.keep:
                values[name] = raw.decode("utf-8")
        return values
