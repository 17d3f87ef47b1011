"""The benchmark's per-cell counts: each offered user lands in exactly one place."""

from __future__ import annotations

from hypothesis import given, strategies as st

from bench.harness import account

USERS = [f"u{i}" for i in range(6)]


def test_a_failed_call_that_finished_anyway_is_completed_not_negative() -> None:
    # At 100/s a start call timed out after Temporal had accepted the event: the user finished.
    # The old arithmetic (offered - failed - done) reported "not done -1" for this.
    counts = account(["a", "b", "c"], failed={"c"}, done={"a", "b", "c"}, holding={"a", "b", "c"})
    assert (counts.submitted, counts.failed_calls, counts.completed) == (3, 1, 3)
    assert counts.not_done == 0 and counts.lost == 0


def test_accepted_but_never_finished_is_not_done_and_lost() -> None:
    counts = account(["a", "b", "c", "d"], failed={"d"}, done={"a"}, holding={"a"})
    assert counts.completed == 1
    assert counts.not_done == 2  # b and c; d's caller was told it failed
    assert (counts.late, counts.lost) == (0, 2)


def test_unfinished_at_the_drain_but_finished_later_is_late_not_lost() -> None:
    # A durable backlog: b was queued at the drain and finished during the settle; c never did.
    counts = account(["a", "b", "c"], failed=set(), done={"a"}, late={"b"}, holding={"a", "b"})
    assert (counts.completed, counts.not_done, counts.late, counts.lost) == (1, 2, 1, 1)


def test_finished_late_without_the_permission_is_lost() -> None:
    counts = account(["a", "b"], failed=set(), done={"a"}, late={"b"}, holding={"a"})
    assert (counts.not_done, counts.late, counts.lost) == (1, 1, 1)


def test_finished_without_the_permission_is_lost_but_done() -> None:
    counts = account(["a", "b"], failed=set(), done={"a", "b"}, holding={"a"})
    assert (counts.completed, counts.not_done, counts.lost) == (2, 0, 1)


def test_without_rows_lost_is_what_never_finished() -> None:
    counts = account(["a", "b", "c"], failed={"b"}, done={"a", "b"}, holding=None)
    assert (counts.completed, counts.not_done, counts.lost) == (2, 1, 1)
    late = account(["a", "b", "c"], failed={"b"}, done={"a", "b"}, late={"c"}, holding=None)
    assert (late.not_done, late.late, late.lost) == (1, 1, 0)


@given(
    failed=st.sets(st.sampled_from(USERS)),
    done=st.sets(st.sampled_from(USERS)),
    late=st.sets(st.sampled_from(USERS)),
    holding=st.none() | st.sets(st.sampled_from(USERS)),
)
def test_every_user_is_counted_once(
    failed: set[str], done: set[str], late: set[str], holding: set[str] | None
) -> None:
    late -= done  # the settle only looks at users unfinished at the drain
    counts = account(USERS, failed=failed, done=done, late=late, holding=holding)
    told_failed = failed - done  # the app heard "failed" and nothing finished
    assert counts.completed + counts.not_done + len(told_failed) == counts.submitted == len(USERS)
    assert min(counts.completed, counts.not_done, counts.late, counts.lost) >= 0
    assert counts.late <= counts.not_done
    # Whatever is unfinished even after the settle is lost; a late user is lost only ungranted.
    assert counts.not_done - counts.late <= counts.lost <= counts.submitted - len(failed)
