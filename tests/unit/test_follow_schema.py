"""Follow mode's schema checks: what a mapping needs defined, and when a check proves a
relationship exists."""

from __future__ import annotations

from spicesync.spicedb import REQUIRED_RELATIONS, load_schema, missing_schema, relations_direct_only

SCHEMA = """
definition user {
    relation sync_version: spicesync_version
}

definition spicesync_version {}

definition organization {
    relation owner: user
    relation admin: user
    relation member: user | organization#owner
    permission view = owner + admin + member
}

definition team {
    relation lead: user
    relation member: user:* | user
}
"""


def test_owned_mode_still_needs_exactly_its_schema() -> None:
    assert missing_schema(load_schema()) == []
    assert missing_schema("definition user {}", REQUIRED_RELATIONS) == [
        "organization#member: user",
        "organization#admin: user",
        "user#sync_version: spicesync_version",
        "definition organization",
        "definition spicesync_version",
    ]


def test_a_mapping_needs_its_managed_relations_and_the_marker() -> None:
    required = (
        ("organization", "admin", "user"),
        ("team", "lead", "user"),
        ("squad", "member", "user"),
        ("user", "sync_version", "spicesync_version"),
    )
    assert missing_schema(SCHEMA, required) == ["squad#member: user", "definition squad"]


def test_a_check_proves_a_relationship_only_without_subject_sets_or_wildcards() -> None:
    assert relations_direct_only(SCHEMA, [("organization", "admin"), ("team", "lead")])
    assert not relations_direct_only(SCHEMA, [("organization", "member")])
    assert not relations_direct_only(SCHEMA, [("team", "member")])
    assert not relations_direct_only(SCHEMA, [("team", "unknown")])
    assert not relations_direct_only(SCHEMA, [("squad", "member")])
