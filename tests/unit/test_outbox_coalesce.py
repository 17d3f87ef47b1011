"""The relay's coalescing: one change per user per batch, standing for all of the user's rows."""

from __future__ import annotations

from workers.outbox_relay import PendingChange, coalesce


def test_one_change_per_user_in_first_row_order_with_the_highest_version() -> None:
    rows = [(1, "b", 1), (2, "a", 4), (3, "b", 3), (4, "b", 2), (5, "c", None)]
    assert coalesce(rows) == [
        PendingChange("b", 3, (1, 3, 4)),
        PendingChange("a", 4, (2,)),
        PendingChange("c", None, (5,)),
    ]


def test_a_row_without_a_version_makes_the_change_unversioned() -> None:
    # A versionless row may stand for a change newer than any version seen: always sync it.
    [change] = coalesce([(7, "a", 9), (8, "a", None)])
    assert change.version is None and change.seqs == (7, 8)


def test_the_signal_carries_the_last_seq_as_its_position() -> None:
    change = PendingChange("a", 2, (7, 12)).change()
    assert (change.user_id, change.version, change.position, change.source) == (
        "a",
        2,
        "outbox:12",
        "outbox",
    )
