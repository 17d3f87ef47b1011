"""Classification of one user's drift between the App DB and SpiceDB."""

from __future__ import annotations

from activities.drift import IN_FLIGHT, AppRow, classify, classify_followed
from spicesync.mapping import Tuple
from spicesync.models import Drift, Membership, MembershipsSnapshot

U = "5b0e8a58-7d4e-4c1b-9a57-1f1f3c0e2a11"
ROW = AppRow(user_id=U, org_id="acme", role="member", version=3)


def snap(*held: tuple[str, str], marker: int | None = 3) -> MembershipsSnapshot:
    return MembershipsSnapshot(
        memberships=[Membership(user_id=U, org_id=o, role=r) for o, r in held], marker=marker
    )


def test_agreeing_stores_are_not_drift() -> None:
    assert classify(ROW, snap(("acme", "member"))) is None
    assert classify(None, snap(marker=4)) is None  # a deleted user keeps only its marker


def test_a_lost_membership_is_missing() -> None:
    assert classify(ROW, snap(marker=None)) == Drift(user_id=U, kind="missing")
    assert classify(ROW, snap(marker=3)) == Drift(user_id=U, kind="missing")


def test_a_wrong_or_extra_membership_is_mismatched_and_counts_its_deletions() -> None:
    assert classify(ROW, snap(("acme", "admin"))) == Drift(
        user_id=U, kind="mismatched", deletions=1
    )
    assert classify(ROW, snap(("acme", "member"), ("other", "admin"), ("x", "member"))) == Drift(
        user_id=U, kind="mismatched", deletions=2
    )


def test_relationships_without_a_row_are_an_orphan() -> None:
    assert classify(None, snap(("acme", "member"), ("b", "admin"))) == Drift(
        user_id=U, kind="orphan", deletions=2
    )


def test_a_live_sync_between_its_writes_is_left_alone() -> None:
    # SpiceDB already holds version 4, the row is about to be recorded at 4.
    assert classify(ROW, snap(("acme", "admin"), marker=4)) == IN_FLIGHT
    creating = AppRow(user_id=U, org_id="acme", role="member", version=1, creating=True)
    assert classify(creating, snap(marker=None)) == IN_FLIGHT


def test_a_creation_that_never_finished_is_drift_not_a_live_sync() -> None:
    creating = AppRow(user_id=U, org_id="acme", role="member", version=1, creating=True)
    assert classify(creating, snap(marker=None)) == IN_FLIGHT
    unfinished = AppRow(
        user_id=U, org_id="acme", role="member", version=1, creating=True, unfinished=True
    )
    assert classify(unfinished, snap(marker=None)) == Drift(user_id=U, kind="unfinished")
    assert classify(unfinished, snap(("acme", "member"), marker=1)) == Drift(
        user_id=U, kind="unfinished", deletions=1
    )


def test_a_row_spicesync_never_wrote_is_unsynced_not_missing() -> None:
    by_hand = AppRow(user_id=U, org_id="acme", role="member", version=1, never_synced=True)
    assert classify(by_hand, snap(marker=None)) == Drift(user_id=U, kind="unsynced")
    assert classify(by_hand, snap(("acme", "member"), marker=None)) is None


# Follow mode: what a row implies through the mapping against the managed relationships held.

A = Tuple("organization", "acme", "member", "user", "7")
B = Tuple("team", "alpha", "lead", "user", "7")
C = Tuple("team", "beta", "member", "user", "7")


def test_followed_user_agreeing_or_absent_everywhere_is_not_drift() -> None:
    assert classify_followed("7", frozenset({A, B}), frozenset({A, B}), synced=True) is None
    assert classify_followed("7", frozenset(), frozenset(), synced=False) is None
    assert classify_followed("7", None, frozenset(), synced=False) is None


def test_followed_user_lacking_relationships_is_missing_or_unsynced() -> None:
    assert classify_followed("7", frozenset({A, B}), frozenset({A}), synced=True) == Drift(
        user_id="7", kind="missing"
    )
    # Never synced by spicesync (no bookkeeping row): the backfill's kind.
    assert classify_followed("7", frozenset({A, B}), frozenset(), synced=False) == Drift(
        user_id="7", kind="unsynced"
    )


def test_followed_user_holding_more_than_the_row_implies_is_extra() -> None:
    # Keeps some relationships: not what the prune cap guards.
    assert classify_followed("7", frozenset({A}), frozenset({A, C}), synced=True) == Drift(
        user_id="7", kind="extra"
    )
    assert classify_followed("7", frozenset({A, B}), frozenset({C}), synced=True) == Drift(
        user_id="7", kind="extra"
    )
    # Would be left with none: every deletion counts against the prune cap.
    assert classify_followed("7", frozenset(), frozenset({A, C}), synced=True) == Drift(
        user_id="7", kind="extra", deletions=2
    )


def test_followed_relationships_without_a_row_are_an_orphan() -> None:
    assert classify_followed("7", None, frozenset({A, B, C}), synced=True) == Drift(
        user_id="7", kind="orphan", deletions=3
    )
