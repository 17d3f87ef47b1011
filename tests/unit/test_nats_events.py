"""What ``spicesync relay nats`` reads from a message: the seed's ``user.created``-style event and
Debezium's change event (with or without the schema wrapper); everything else is unusable, with
a reason and never the message's content."""

from __future__ import annotations

import json
from typing import Any

import pytest

from spicesync.mapping import parse_mapping
from workers.nats_events import (
    REASONS,
    EventFormat,
    NatsEvent,
    PendingEvent,
    UnusableMessage,
    coalesce_events,
    parse_event,
)

_MAPPING = """
[source]
table = "accounts"
id = "account_id"
version = "row_version"

[[relationships]]
resource = "organization:{team_id}"
relation = "member"
subject = "user:{account_id}"
"""
VERSIONED = EventFormat.of(parse_mapping(_MAPPING))
UNVERSIONED = EventFormat.of(parse_mapping(_MAPPING.replace('version = "row_version"\n', "")))


def _body(document: Any) -> bytes:
    return json.dumps(document).encode()


def _debezium(op: str, before: Any, after: Any, *, wrapped: bool = False) -> bytes:
    payload = {
        "op": op,
        "before": before,
        "after": after,
        "source": {"connector": "postgresql", "lsn": 24023128, "table": "accounts"},
        "ts_ms": 1700000000000,
    }
    return _body({"schema": {"type": "struct"}, "payload": payload} if wrapped else payload)


def test_a_payload_wrapper_without_its_schema_is_still_debezium() -> None:
    body = _body({"payload": {"op": "c", "before": None, "after": {"account_id": "acct-1"}}})
    assert parse_event(body, VERSIONED) == NatsEvent("acct-1", None)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"user_id": "acct-1"}, NatsEvent("acct-1")),
        ({"user_id": "acct-1", "version": 3}, NatsEvent("acct-1", 3)),
        ({"id": "acct-1", "email": "a@example.com"}, NatsEvent("acct-1")),
        ({"id": 42}, NatsEvent("42")),
        (
            {"event_type": "user.created", "payload": {"user_id": "acct-1", "version": 2}},
            NatsEvent("acct-1", 2),
        ),
        ({"type": "user.created", "data": {"id": "acct-1"}}, NatsEvent("acct-1")),
    ],
)
def test_seed_events_name_their_user_and_version(document: Any, expected: NatsEvent) -> None:
    assert parse_event(_body(document), VERSIONED) == expected


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("op", ["c", "u", "r"])
def test_debezium_row_events_take_the_mapped_columns_of_after(op: str, wrapped: bool) -> None:
    before = {"account_id": "acct-1", "row_version": 1}
    after = {"account_id": "acct-1", "team_id": "t", "row_version": 2}
    body = _debezium(op, None if op != "u" else before, after, wrapped=wrapped)
    assert parse_event(body, VERSIONED) == NatsEvent("acct-1", 2)
    # No version column: the source position stands in.
    assert parse_event(body, UNVERSIONED) == NatsEvent("acct-1", 24023128)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_debezium_delete_names_the_before_row_and_always_syncs(wrapped: bool) -> None:
    # With before's version the change would be "already synced" and the delete skipped.
    body = _debezium("d", {"account_id": "acct-1", "row_version": 5}, None, wrapped=wrapped)
    assert parse_event(body, VERSIONED) == NatsEvent("acct-1", None)
    assert parse_event(body, UNVERSIONED) == NatsEvent("acct-1", None)


def test_without_a_mapping_debezium_rows_are_keyed_by_user_id_or_id() -> None:
    body = _debezium("c", None, {"user_id": "u-1", "org_id": "o"})
    assert parse_event(body, EventFormat.of(None)) == NatsEvent("u-1", 24023128)


SECRET = "someone@example.com"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe not json", "not_json"),
        (b"", "not_json"),
        (b"user_id=acct-1", "not_json"),
        (b'["acct-1", "org", "member"]', "not_an_object"),
        (b"null", "not_an_object"),
        (_body({"email": SECRET}), "no_user_id"),
        (_body({"payload": {"email": SECRET}}), "no_user_id"),
        (_body({"user_id": SECRET}), "invalid_user_id"),
        (_body({"user_id": ""}), "invalid_user_id"),
        (_body({"user_id": True}), "invalid_user_id"),
        (_body({"user_id": "x" * 129}), "invalid_user_id"),
        (_body({"user_id": "acct-1", "version": "3"}), "invalid_version"),
        (_body({"user_id": "acct-1", "version": -1}), "invalid_version"),
        (_debezium("t", None, None), "unsupported_op"),
        (_debezium("c", None, None), "no_user_id"),
        (_debezium("d", None, None), "no_user_id"),
        (_debezium("c", None, {"email": SECRET}), "no_user_id"),
        (_debezium("c", None, {"account_id": SECRET}), "invalid_user_id"),
        (_debezium("u", None, {"account_id": "a", "row_version": 1.5}), "invalid_version"),
    ],
)
def test_unusable_messages_say_why_and_never_what(body: bytes, reason: str) -> None:
    with pytest.raises(UnusableMessage) as caught:
        parse_event(body, VERSIONED)
    assert caught.value.reason == reason
    assert reason in REASONS
    assert SECRET not in str(caught.value)


def test_one_change_per_user_with_the_highest_version_unless_one_had_none() -> None:
    events = [
        (10, NatsEvent("b", 1)),
        (11, NatsEvent("a", 4)),
        (12, NatsEvent("b", 3)),
        (13, NatsEvent("c", 1)),
        (14, NatsEvent("c", None)),
    ]
    assert coalesce_events(events) == [
        PendingEvent("b", 3, (10, 12)),
        PendingEvent("a", 4, (11,)),
        PendingEvent("c", None, (13, 14)),
    ]
