"""The CDC relay's pure parts: pgoutput decoding, per-user changes, how far the slot may move.

The messages are built here byte by byte after PostgreSQL's protocol documentation (logical
replication message formats, protocol version 1); the integration tests feed the decoder the
real server's messages.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from workers.cdc_changes import Transaction, coalesce, confirmable, read_transactions
from workers.pgoutput import (
    Begin,
    Commit,
    DecodeError,
    Decoder,
    Relation,
    RowChange,
    Truncate,
    format_lsn,
)

OID = 16400
OTHER = 16500
# 2026-01-01T00:00:00Z in microseconds since 2000-01-01.
WHEN = int((datetime(2026, 1, 1, tzinfo=UTC) - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds())
WHEN_US = WHEN * 1_000_000


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def relation(oid: int = OID, columns: tuple[str, ...] = ("id", "email", "v")) -> bytes:
    body = struct.pack("!I", oid) + _s("app") + _s("accounts") + b"d"
    body += struct.pack("!h", len(columns))
    for index, name in enumerate(columns):
        body += struct.pack("!b", 1 if index == 0 else 0) + _s(name) + struct.pack("!Ii", 25, -1)
    return b"R" + body


def tuple_data(*values: str | None, unchanged: int | None = None) -> bytes:
    out = struct.pack("!h", len(values))
    for index, value in enumerate(values):
        if index == unchanged:
            out += b"u"
        elif value is None:
            out += b"n"
        else:
            raw = value.encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


def begin(final_lsn: int = 0x100, xid: int = 7) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, WHEN_US, xid)


def commit(commit_lsn: int, end_lsn: int) -> bytes:
    return b"C" + struct.pack("!bQQq", 0, commit_lsn, end_lsn, WHEN_US)


def insert(*values: str | None, oid: int = OID) -> bytes:
    return b"I" + struct.pack("!I", oid) + b"N" + tuple_data(*values)


def update(*values: str | None, old: tuple[str | None, ...] | None = None) -> bytes:
    body = b"U" + struct.pack("!I", OID)
    if old is not None:
        body += b"K" + tuple_data(*old)
    return body + b"N" + tuple_data(*values)


def delete(*key: str | None) -> bytes:
    return b"D" + struct.pack("!I", OID) + b"K" + tuple_data(*key)


def truncate(*oids: int) -> bytes:
    return b"T" + struct.pack("!ib", len(oids), 0) + b"".join(struct.pack("!I", o) for o in oids)


def test_begin_commit_and_relation_decode() -> None:
    decoder = Decoder(keep=frozenset({"id"}))
    assert decoder.decode(begin(0x1_0000_0010, 42)) == Begin(
        0x1_0000_0010, datetime(2026, 1, 1, tzinfo=UTC), 42
    )
    assert decoder.decode(commit(0x20, 0x48)) == Commit(
        0x20, 0x48, datetime(2026, 1, 1, tzinfo=UTC)
    )
    assert decoder.decode(relation()) == Relation(OID, "app", "accounts", "d", ("id", "email", "v"))
    assert format_lsn(0x16_B374D848) == "16/B374D848"


def test_row_changes_keep_only_the_asked_columns() -> None:
    decoder = Decoder(keep=frozenset({"id", "v"}))
    decoder.decode(relation())
    change = decoder.decode(insert("u1", "ada@example.com", "3"))
    assert isinstance(change, RowChange) and change.kind == "insert"
    # The email column is never kept: it may hold personal data.
    assert change.new == {"id": "u1", "v": "3"} and change.old is None
    moved = decoder.decode(update("u2", None, "4", old=("u1", None, None)))
    assert isinstance(moved, RowChange)
    assert (moved.new, moved.old) == ({"id": "u2", "v": "4"}, {"id": "u1"})
    gone = decoder.decode(delete("u2", None, None))
    assert isinstance(gone, RowChange) and gone.kind == "delete"
    assert (gone.new, gone.old) == (None, {"id": "u2"})


def test_unchanged_toast_and_null_values_are_absent() -> None:
    decoder = Decoder(keep=frozenset({"id", "email"}))
    decoder.decode(relation())
    body = b"U" + struct.pack("!I", OID) + b"N" + tuple_data("u1", "x", None, unchanged=1)
    change = decoder.decode(body)
    assert isinstance(change, RowChange) and change.new == {"id": "u1"}


def test_truncate_names_its_tables_and_unknown_tables_fail() -> None:
    decoder = Decoder(keep=frozenset({"id"}))
    with pytest.raises(DecodeError, match="before its Relation"):
        decoder.decode(insert("u1", None, None))
    decoder.decode(relation())
    message = decoder.decode(truncate(OID))
    assert isinstance(message, Truncate) and [r.name for r in message.relations] == ["accounts"]
    with pytest.raises(DecodeError):
        decoder.decode(b"I" + struct.pack("!I", OID) + b"N" + b"\x00")  # cut short
    assert decoder.decode(b"Y" + struct.pack("!I", 1) + _s("public") + _s("t")) is None


def _stream() -> list[bytes]:
    return [
        begin(),
        relation(),
        relation(OTHER),
        insert("u1", "a@example.com", "1"),
        insert("x9", None, "1", oid=OTHER),  # another table of the publication: ignored
        update("u1", None, "2"),
        commit(0x100, 0x180),
        begin(),
        delete("u2", None, None),
        update("u4", None, "7", old=("u3", None, None)),
        commit(0x200, 0x280),
        begin(),
        truncate(OID),
        commit(0x300, 0x380),
        begin(),
        commit(0x400, 0x480),  # a heartbeat: no change, still confirmable past
    ]


def test_transactions_name_every_changed_user_with_versions() -> None:
    decoder = Decoder(keep=frozenset({"id", "v"}))
    found = read_transactions(decoder, _stream(), table_oid=OID, id_column="id", version_column="v")
    assert [(t.commit_lsn, t.end_lsn, t.users, t.truncated) for t in found] == [
        (0x100, 0x180, [("u1", 1), ("u1", 2)], False),
        (0x200, 0x280, [("u2", None), ("u4", 7), ("u3", None)], False),
        (0x300, 0x380, [], True),
        (0x400, 0x480, [], False),
    ]


def test_without_a_version_column_the_commit_position_is_the_version() -> None:
    decoder = Decoder(keep=frozenset({"id"}))
    found = read_transactions(
        decoder, _stream(), table_oid=OID, id_column="id", version_column=None
    )
    assert found[0].users == [("u1", 0x100), ("u1", 0x100)]
    changes = {c.user_id: c for c in coalesce(found)}
    assert changes["u4"].version == 0x200
    signal = changes["u1"].change()
    assert (signal.source, signal.position, signal.version) == ("cdc", "wal:0/100", 0x100)


def test_coalesce_one_change_per_user_highest_version_or_none() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    batch = [
        Transaction(1, 2, when, [("a", 1), ("b", 5)]),
        Transaction(3, 4, when, [("a", 3), ("b", None), ("c", 2)]),
    ]
    assert [(c.user_id, c.version, c.commit_lsn) for c in coalesce(batch)] == [
        ("a", 3, 3),
        ("b", None, 3),  # a delete among them: synced whatever was applied
        ("c", 2, 3),
    ]


def test_confirmable_stops_at_the_first_transaction_not_wholly_accepted() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    batch = [
        Transaction(1, 10, when, [("a", None)]),
        Transaction(11, 20, when, [], truncated=True),
        Transaction(21, 30, when, [("b", None)]),
        Transaction(31, 40, when, []),
    ]
    assert confirmable(batch, {"a", "b"}, {11}) == 40
    assert confirmable(batch, {"a"}, {11}) == 10 * 2  # b refused: stop before its commit
    assert confirmable(batch, {"a", "b"}, set()) == 10  # the truncate's reconcile not started
    assert confirmable(batch, set(), {11}) is None
