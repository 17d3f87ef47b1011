"""Follow mode's mapping: parsing, the errors that name the bad key, what a row implies."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from spicesync.app_table import AppTable
from spicesync.mapping import (
    FollowMapping,
    MappingError,
    Tuple,
    UnmappableRow,
    load_mapping,
    parse_mapping,
    valid_user_id,
)
from spicesync.spicedb import missing_schema

ISSUE_EXAMPLE = """
[source]
table = "app.accounts"
id = "account_id"
version = "row_version"

[[relationships]]
resource = "organization:{team_id}"
relation = "admin"
subject = "user:{account_id}"
when = "is_admin"

[[relationships]]
resource = "organization:{team_id}"
relation = "member"
subject = "user:{account_id}"
unless = "is_admin"

[[relationships]]
resource = "team:{squad}"
relation = "{squad_role}"
relations = ["lead", "member"]
subject = "user:{account_id}"
"""

UID = "7d0c3f5e-0000-4000-8000-000000000001"


def row(**values: object) -> dict[str, object]:
    base: dict[str, object] = {
        "account_id": UID,
        "row_version": 3,
        "team_id": "acme",
        "is_admin": False,
        "squad": "red",
        "squad_role": "lead",
    }
    return base | values


@pytest.fixture
def mapping() -> FollowMapping:
    return parse_mapping(ISSUE_EXAMPLE)


def test_the_issues_example_parses_into_what_spicesync_manages(mapping: FollowMapping) -> None:
    assert mapping.source.qualified == '"app"."accounts"'
    assert mapping.subject_type == "user"
    assert mapping.managed == {
        ("organization", "admin"),
        ("organization", "member"),
        ("team", "lead"),
        ("team", "member"),
    }
    assert mapping.managed_resource_types == ("organization", "team")
    # Only what the rules use, id first: no other column (PII) is ever read.
    assert mapping.columns == (
        "account_id",
        "row_version",
        "team_id",
        "is_admin",
        "squad",
        "squad_role",
    )
    assert mapping.required_schema() == (
        ("organization", "admin", "user"),
        ("organization", "member", "user"),
        ("team", "lead", "user"),
        ("team", "member", "user"),
        ("user", "sync_version", "spicesync_version"),
    )


def test_when_and_unless_pick_one_of_two_rules(mapping: FollowMapping) -> None:
    member = mapping.relationships(UID, row(is_admin=False))
    admin = mapping.relationships(UID, row(is_admin=True))
    assert Tuple("organization", "acme", "member", "user", UID) in member
    assert Tuple("organization", "acme", "admin", "user", UID) not in member
    assert Tuple("organization", "acme", "admin", "user", UID) in admin
    assert Tuple("organization", "acme", "member", "user", UID) not in admin


def test_a_null_condition_is_neither_true_nor_false(mapping: FollowMapping) -> None:
    # `when` needs TRUE; `unless` skips only on TRUE: a NULL flag makes a member.
    assert mapping.relationships(UID, row(is_admin=None, squad=None)) == {
        Tuple("organization", "acme", "member", "user", UID)
    }


def test_the_relation_taken_from_a_column(mapping: FollowMapping) -> None:
    assert Tuple("team", "red", "member", "user", UID) in mapping.relationships(
        UID, row(squad_role="member")
    )
    assert Tuple("team", "red", "lead", "user", UID) in mapping.relationships(UID, row())


def test_a_null_skips_only_its_own_rule(mapping: FollowMapping) -> None:
    assert mapping.relationships(UID, row(team_id=None)) == {
        Tuple("team", "red", "lead", "user", UID)
    }
    assert mapping.relationships(UID, row(squad=None)) == {
        Tuple("organization", "acme", "member", "user", UID)
    }
    assert mapping.relationships(UID, row(squad_role=None)) == {
        Tuple("organization", "acme", "member", "user", UID)
    }


def test_a_row_that_is_gone_implies_nothing(mapping: FollowMapping) -> None:
    assert mapping.relationships(UID, None) == frozenset()


def test_templates_with_literal_text_and_several_columns() -> None:
    mapping = parse_mapping(
        """
        [source]
        table = "accounts"
        id = "id"
        [[relationships]]
        resource = "project:{tenant}-{project}"
        relation = "viewer"
        subject = "member:{id}"
        """
    )
    got = mapping.relationships("42", {"id": 42, "tenant": "t1", "project": 7})
    assert got == {Tuple("project", "t1-7", "viewer", "member", "42")}
    assert mapping.subject_type == "member"
    assert mapping.required_schema()[-1] == ("member", "sync_version", "spicesync_version")


def test_an_invalid_object_id_names_the_rule_and_columns_not_the_value(
    mapping: FollowMapping,
) -> None:
    with pytest.raises(UnmappableRow) as err:
        mapping.relationships(UID, row(squad="Jane Doe's team"))
    assert str(err.value).startswith("relationships[2].resource: columns squad")
    assert "Jane" not in str(err.value)


def test_a_relation_outside_the_rules_list_is_unmappable(mapping: FollowMapping) -> None:
    with pytest.raises(UnmappableRow) as err:
        mapping.relationships(UID, row(squad_role="owner"))
    assert "relationships[2].relation" in str(err.value) and "owner" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (('table = "app.accounts"', 'table = "a.b.c"'), "source.table"),
        (('id = "account_id"', 'id = "account id"'), "source.id"),
        (('version = "row_version"', 'version = "row-version"'), "source.version"),
        (('when = "is_admin"', 'when = "is admin"'), "relationships[0].when"),
        (('unless = "is_admin"', 'unless = "1x"'), "relationships[1].unless"),
        (('relation = "admin"', 'relation = "Admin"'), "relationships[0].relation"),
        (('resource = "team:{squad}"', 'resource = "team"'), "relationships[2].resource"),
        (
            ('relations = ["lead", "member"]', 'relations = ["lead", "Member"]'),
            "relationships[2].relations",
        ),
        (('relations = ["lead", "member"]', ""), "relationships[2].relations"),
        (
            ('subject = "user:{account_id}"\nwhen', 'subject = "user:{team_id}"\nwhen'),
            "relationships[0].subject",
        ),
        (('relation = "member"', 'relation = "sync_version"'), "relationships[1].relation"),
        (('when = "is_admin"', 'when = "is_admin"\nunless = "x"'), "relationships[0]"),
        (("[source]", '[source]\ncolour = "red"'), "source.colour"),
    ],
)
def test_a_bad_key_is_named(change: tuple[str, str], key: str) -> None:
    old, new = change
    assert old in ISSUE_EXAMPLE
    with pytest.raises(MappingError) as err:
        parse_mapping(ISSUE_EXAMPLE.replace(old, new, 1), origin="app.toml")
    assert f"app.toml: {key}" in str(err.value)


def test_every_subject_is_of_one_type_and_a_rule_is_needed() -> None:
    with pytest.raises(MappingError) as err:
        parse_mapping(
            ISSUE_EXAMPLE.replace(
                'subject = "user:{account_id}"\nunless', 'subject = "member:{account_id}"\nunless'
            )
        )
    assert "every subject must be of one type" in str(err.value)
    with pytest.raises(MappingError) as err:
        parse_mapping('[source]\ntable = "t"\nid = "id"\n')
    assert "at least one [[relationships]] rule" in str(err.value)


def test_a_missing_file_and_bad_toml_are_named(tmp_path: Path) -> None:
    with pytest.raises(MappingError) as err:
        load_mapping(tmp_path / "nope.toml")
    assert str(err.value).startswith(f"{tmp_path / 'nope.toml'}: cannot read the mapping")
    bad = tmp_path / "bad.toml"
    bad.write_text("[source\n")
    with pytest.raises(MappingError) as err:
        load_mapping(bad)
    assert str(err.value).startswith(f"{bad}: not valid TOML")


def test_user_ids_are_opaque_and_spicedb_safe() -> None:
    assert valid_user_id(UID) and valid_user_id("42") and valid_user_id("a/b|c-d=e+f_g")
    assert not valid_user_id("") and not valid_user_id("a b") and not valid_user_id("x" * 129)
    assert not valid_user_id("jane@example.com")


@pytest.mark.parametrize(
    ("id_type", "user_id", "bound"),
    [
        ("uuid", UID, uuid.UUID(UID)),
        # Another spelling of the same uuid is another (nonexistent) subject id.
        ("uuid", UID.upper(), None),
        ("uuid", "42", None),
        ("bigint", "42", 42),
        ("bigint", "-7", -7),
        ("bigint", "042", None),
        ("integer", str(2**31), None),
        ("bigint", str(2**31), 2**31),
        ("bigint", "4x", None),
        ("text", "Abc", "Abc"),
        ("character varying", "a/b", "a/b"),
    ],
)
def test_the_user_id_is_bound_as_the_id_columns_type(
    mapping: FollowMapping, id_type: str, user_id: str, bound: object
) -> None:
    table = AppTable(mapping=mapping, id_type=id_type, select="")
    assert table.id_value(user_id) == bound


def test_the_schema_check_uses_the_mappings_needs(mapping: FollowMapping) -> None:
    schema = """
    definition user { relation sync_version: spicesync_version }
    definition spicesync_version {}
    definition organization {
        relation owner: user
        relation admin: user
        relation member: user
    }
    definition team {
        relation lead: user
    }
    """
    assert missing_schema(schema, mapping.required_schema()) == ["team#member: user"]
    assert missing_schema(
        schema.replace("definition team", "definition squad"), mapping.required_schema()
    ) == [
        "team#lead: user",
        "team#member: user",
        "definition team",
    ]
    # Owned mode's check is unchanged.
    assert missing_schema(schema) == []
