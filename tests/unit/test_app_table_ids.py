"""Follow mode's text ids turned back into the application's id column type."""

from __future__ import annotations

import uuid

import pytest

from spicesync.app_table import AppTableMismatch, id_parser


def test_an_integer_id_matches_only_the_text_its_row_prints_as() -> None:
    parse = id_parser("bigint")
    assert parse("42") == 42 and parse("-7") == -7
    # A subject id no row's id prints as can have no row: not a number, padded, out of range.
    for text in ("007", "4.2", "ghost", "", "+1", "9223372036854775808", "42 "):
        assert parse(text) is None, text
    assert id_parser("integer")("2147483648") is None
    assert id_parser("smallint")("32767") == 32767


def test_a_uuid_id_matches_only_its_canonical_text() -> None:
    parse = id_parser("uuid")
    value = uuid.uuid4()
    assert parse(str(value)) == value
    assert parse(str(value).upper()) is None
    assert parse(value.hex) is None
    assert parse("not-a-uuid") is None


def test_text_ids_pass_and_other_types_are_refused() -> None:
    assert id_parser("text")("acct/9") == "acct/9"
    assert id_parser("character varying")("x") == "x"
    with pytest.raises(AppTableMismatch, match="numeric"):
        id_parser("numeric")
