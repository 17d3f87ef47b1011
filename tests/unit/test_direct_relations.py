"""Follow mode's reconcile: when a permission check proves a managed relationship exists."""

from __future__ import annotations

from spicesync.spicedb import relations_direct_only

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


def test_a_check_proves_a_relationship_only_without_subject_sets_or_wildcards() -> None:
    assert relations_direct_only(SCHEMA, [("organization", "admin"), ("team", "lead")])
    assert not relations_direct_only(SCHEMA, [("organization", "member")])
    assert not relations_direct_only(SCHEMA, [("team", "member")])
    assert not relations_direct_only(SCHEMA, [("team", "unknown")])
    assert not relations_direct_only(SCHEMA, [("squad", "member")])
