"""The follow-mode chaos scenario's own arithmetic: its load, its count of real changes, and its
independent reading of a row, checked against spicesync's mapping of the same row."""

from __future__ import annotations

from collections import Counter

from bench.follow_mode import MAPPING as BENCH_MAPPING
from chaos.follow import MAPPING, AppChange, app_changes, real_changes_per_user
from spicesync.mapping import load_mapping, parse_mapping


def test_the_load_changes_each_user_after_its_insert_and_never_after_its_delete() -> None:
    changes = list(app_changes(100, org="o"))
    kinds = Counter(c.kind for c in changes)
    assert kinds["insert"] == 100
    assert kinds["delete"] == 9 and kinds["update"] > 50
    seen: dict[str, list[str]] = {}
    for change in changes:
        seen.setdefault(change.user_id, []).append(change.kind)
    for history in seen.values():
        assert history[0] == "insert" and "insert" not in history[1:]
        assert "delete" not in history[:-1]


def test_only_changes_of_what_a_row_implies_count_as_real() -> None:
    row = AppChange("u1", "A", "team-a", False, "insert")
    renamed = AppChange("u1", "A (renamed)", "team-a", False, "update")
    promoted = AppChange("u1", "A (renamed)", "team-a", True, "update")
    gone = AppChange("u1", "A (renamed)", "team-a", True, "delete")
    other = AppChange("u2", "B", "team-b", False, "insert")
    counts = real_changes_per_user([row, other, renamed, promoted, gone])
    # The rename changes no relationship, so no SpiceDB write may follow from it.
    assert counts == {"u1": 3, "u2": 1}


def test_the_scenarios_reading_of_a_row_is_the_mappings() -> None:
    mapping = parse_mapping(MAPPING)
    for change in list(app_changes(30, org="o")):
        row = (
            None
            if change.kind == "delete"
            else {
                "account_id": change.user_id,
                "row_version": 1,
                "team_id": change.team_id,
                "is_admin": change.is_admin,
            }
        )
        tuples = mapping.relationships(change.user_id, row)
        assert {(t.resource_id, t.relation) for t in tuples} == change.implies()
        assert all(
            (t.resource_type, t.subject_type, t.subject_id)
            == ("organization", "user", change.user_id)
            for t in tuples
        )


def test_the_benchmarks_mapping_gives_owned_modes_memberships() -> None:
    mapping = load_mapping(BENCH_MAPPING)
    assert mapping.managed == {("organization", "admin"), ("organization", "member")}
    assert mapping.subject_type == "user"
