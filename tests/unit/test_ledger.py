"""The per-user event ledger, alone and against a simple model (hypothesis)."""

from __future__ import annotations

import uuid

from hypothesis import given, settings, strategies as st

from spicesync.models import EventOutcome, UserEvent, UserState
from workflows.ledger import EventLedger, content_digest

USER = str(uuid.uuid4())
NOBODY = UserState(exists=False, version=0)


def event(version: int, kind: str = "role_changed", event_id: str | None = None) -> UserEvent:
    return UserEvent(
        event_id=event_id or f"e{version}",
        user_id=USER,
        version=version,
        kind=kind,
        org_id="" if kind == "deleted" else f"org{version}",
        role="" if kind == "deleted" else "member",
    )


def apply(ledger: EventLedger, e: UserEvent) -> None:
    """What the workflow does with a ready event (every application succeeds here)."""
    assert ledger.state.exists or e.kind in ("created", "deleted")
    state = (
        UserState(exists=False, version=e.version)
        if e.kind == "deleted"
        else UserState(exists=True, version=e.version, org_id=e.org_id, role=e.role)
    )
    ledger.finish(e, EventOutcome(event_id=e.event_id, version=e.version, status="applied"), state)


def test_duplicates_get_the_first_outcome() -> None:
    ledger = EventLedger(NOBODY)
    first = event(1, "created")
    assert ledger.offer(first) is None
    assert ledger.offer(first) is None  # still queued: the duplicate waits for the same outcome
    apply(ledger, first)
    assert ledger.offer(first) == ledger.outcome("e1")
    assert ledger.outcome("e1") is not None and ledger.outcome("e1").status == "applied"  # type: ignore[union-attr]


def test_stale_event_is_a_recorded_no_op() -> None:
    ledger = EventLedger(UserState(exists=True, version=5, org_id="o", role="member"))
    outcome = ledger.offer(event(3))
    assert outcome is not None and outcome.status == "stale"
    assert ledger.next_ready() is None


def test_the_event_the_app_db_records_as_applied_is_answered_applied_not_stale() -> None:
    # A new run (a replay after a worker died, or a delivery after the workflow closed) finds
    # the App DB already recording this very event: its outcome is "applied", with the token.
    state = UserState(
        exists=True, version=5, org_id="org5", role="member", applied_event="e5", zed_token="zt"
    )
    ledger = EventLedger(state)
    outcome = ledger.offer(event(5))
    assert outcome is not None and (outcome.status, outcome.zed_token) == ("applied", "zt")
    # Another event at the same version is not this one: stale.
    other = ledger.offer(event(5, event_id="another-e5"))
    assert other is not None and other.status == "stale"
    assert ledger.next_ready() is None


def test_changes_wait_for_the_creation() -> None:
    ledger = EventLedger(NOBODY)
    ledger.offer(event(3))
    ledger.offer(event(2))
    assert ledger.next_ready() is None  # the user does not exist yet
    ledger.offer(event(1, "created"))
    assert ledger.next_ready() == event(1, "created")
    apply(ledger, event(1, "created"))
    assert ledger.next_ready() == event(2)


def test_a_newer_application_makes_queued_older_events_stale() -> None:
    ledger = EventLedger(NOBODY)
    for v in (4, 2):
        ledger.offer(event(v))
    ledger.offer(event(3, "created"))
    apply(ledger, event(3, "created"))  # a re-creation at v3 overtakes v2
    assert ledger.outcome("e2") is not None and ledger.outcome("e2").status == "stale"  # type: ignore[union-attr]
    assert ledger.next_ready() == event(4)


def test_a_held_change_expires_as_failed() -> None:
    ledger = EventLedger(NOBODY)
    ledger.offer(event(2))
    assert ledger.is_holding()
    expired = ledger.expire_held()
    assert (
        expired is not None and expired.status == "failed" and expired.error_type == "UserNotFound"
    )
    late = ledger.offer(event(1, "created"))  # older than a decided event: stale
    assert late is not None and late.status == "stale"


def test_delete_before_create_leaves_the_create_stale() -> None:
    ledger = EventLedger(NOBODY)
    ledger.offer(event(2, "deleted"))
    apply(ledger, ledger.next_ready())  # type: ignore[arg-type]
    late = ledger.offer(event(1, "created"))
    assert late is not None and late.status == "stale"
    assert not ledger.state.exists


def test_a_repair_adopts_the_app_dbs_state_but_versions_never_go_back() -> None:
    ledger = EventLedger(UserState(exists=True, version=5, org_id="o", role="member"))
    # The App DB was restored from an older backup: the repair adopts what it says...
    ledger.refresh(UserState(exists=False, version=0))
    assert not ledger.state.exists
    # A change to a user that no longer exists waits for a creation (one at v6 may be on its
    # way; see the tests of changes to a deleted user for v6 itself).
    assert ledger.next_ready() is None and ledger.offer(event(7)) is None
    assert ledger.is_holding()
    # ...but an event not newer than one already decided is still stale.
    late = ledger.offer(event(4, "created"))
    assert late is not None and late.status == "stale"


def test_memory_is_bounded() -> None:
    ledger = EventLedger(NOBODY, remember=3)
    for v in range(1, 10):
        e = event(v, "created" if v == 1 else "role_changed")
        ledger.offer(e)
        apply(ledger, ledger.next_ready())  # type: ignore[arg-type]
    assert [o.event_id for o in ledger.recent()] == ["e7", "e8", "e9"]


# --- The same event id with other content is a conflict, not a duplicate (issue 15 #1) -------


def conflicts(outcome: EventOutcome | None) -> bool:
    return outcome is not None and (outcome.status, outcome.error_type) == (
        "failed",
        "EventIdConflict",
    )


def test_a_reused_event_id_with_other_content_is_a_conflict_while_queued() -> None:
    ledger = EventLedger(UserState(exists=True, version=3, org_id="org3", role="admin"))
    first = event(4)
    assert ledger.offer(first) is None
    assert ledger.offer(first) is None  # the same content: a duplicate, waiting
    for other in (
        first.model_copy(update={"role": "admin"}),
        first.model_copy(update={"org_id": "elsewhere"}),
        first.model_copy(update={"version": 5}),
        first.model_copy(update={"kind": "moved"}),
    ):
        assert conflicts(ledger.offer(other))
    # The conflicts were not queued and did not replace the first event.
    assert ledger.next_ready() == first
    apply(ledger, first)
    assert ledger.outcome(first.event_id) is not None
    assert ledger.outcome(first.event_id).status == "applied"  # type: ignore[union-attr]


def test_a_reused_event_id_with_other_content_is_a_conflict_once_decided() -> None:
    ledger = EventLedger(NOBODY)
    created = event(1, "created").model_copy(update={"email": "ada@example.com", "name": "Ada"})
    ledger.offer(created)
    apply(ledger, created)
    first = ledger.outcome(created.event_id)
    assert first is not None and first.status == "applied"
    assert ledger.offer(created) == first  # a duplicate: the first outcome
    for other in (
        created.model_copy(update={"email": "bob@example.com"}),
        created.model_copy(update={"name": "Bob"}),
        created.model_copy(update={"role": "admin"}),
    ):
        assert conflicts(ledger.offer(other))
    assert ledger.outcome(created.event_id) == first  # the first outcome stands
    # A stale event's id is taken too.
    stale = event(1, event_id="old")
    assert ledger.offer(stale) is not None
    assert conflicts(ledger.offer(stale.model_copy(update={"role": "admin"})))


def test_remembered_outcomes_keep_a_digest_not_the_content() -> None:
    ledger = EventLedger(NOBODY)
    created = event(1, "created").model_copy(update={"email": "ada@example.com", "name": "Ada"})
    ledger.offer(created)
    apply(ledger, created)
    carried = ledger.recent()
    assert carried[0].content_digest == content_digest(created)
    dumped = str([o.model_dump() for o in carried])
    assert "ada@example.com" not in dumped and "Ada" not in dumped
    # The digest is keyed by the event's ids: the same content under another id differs.
    assert content_digest(created) != content_digest(created.model_copy(update={"event_id": "x"}))
    # A new run (continue-as-new) carries the digests, and still tells the two apart.
    again = EventLedger(ledger.state, carried)
    assert again.offer(created) == carried[0]
    assert conflicts(again.offer(created.model_copy(update={"email": "bob@example.com"})))
    # Outcomes carried by a run from before digests were kept have none: a duplicate then.
    old = EventLedger(ledger.state, [carried[0].model_copy(update={"content_digest": None})])
    assert old.offer(created.model_copy(update={"role": "admin"})) is not None
    assert not conflicts(old.offer(created.model_copy(update={"role": "admin"})))


def test_the_event_the_app_db_records_is_compared_with_the_row() -> None:
    # A new run after the workflow closed knows only what the App DB row (or tombstone) says:
    # the id of the event it applies, its version and its membership.
    row = UserState(
        exists=True, version=5, org_id="org5", role="member", applied_event="e5", zed_token="zt"
    )
    assert not conflicts(EventLedger(row).offer(event(5)))
    assert conflicts(EventLedger(row).offer(event(5).model_copy(update={"role": "admin"})))
    assert conflicts(EventLedger(row).offer(event(5).model_copy(update={"org_id": "other"})))
    # Before, the same id at a newer version was queued and applied as a new event.
    assert conflicts(EventLedger(row).offer(event(6, event_id="e5")))
    assert conflicts(EventLedger(row).offer(event(4, event_id="e5")))
    assert conflicts(EventLedger(row).offer(event(5, "deleted")))
    tombstone = UserState(exists=False, version=5, applied_event="e5")
    deleted = EventLedger(tombstone).offer(event(5, "deleted"))
    assert deleted is not None and deleted.status == "applied"
    assert conflicts(EventLedger(tombstone).offer(event(5, "moved")))


# --- A change to a deleted user fails at once (issue 15 #2) ---------------------------------


def deleted_at(version: int) -> EventLedger:
    """A ledger as a new run starts it for a user the App DB has a tombstone for."""
    return EventLedger(UserState(exists=False, version=version, applied_event=f"e{version}"))


def not_found(outcome: EventOutcome | None) -> bool:
    return outcome is not None and (outcome.status, outcome.error_type) == (
        "failed",
        "UserNotFound",
    )


def test_a_change_to_a_deleted_user_fails_at_once() -> None:
    for kind in ("role_changed", "moved"):
        ledger = deleted_at(2)
        assert not_found(ledger.offer(event(3, kind)))
        assert not ledger.has_pending() and not ledger.is_holding()


def test_a_change_held_for_a_deleted_user_fails_once_its_version_is_next() -> None:
    # v4 after a deletion at v2: a re-creation at v3 may still come, so v4 is held...
    ledger = deleted_at(2)
    assert ledger.offer(event(4)) is None and ledger.is_holding()
    # ...until v3 turns out to be a change too: both fail, at once, in version order.
    assert not_found(ledger.offer(event(3)))
    assert not_found(ledger.outcome("e4")) and not ledger.has_pending()


def test_a_change_to_a_deleted_user_waits_for_a_recreation_that_comes_first() -> None:
    ledger = deleted_at(2)
    recreated = event(3, "created")
    ledger.offer(recreated)
    assert ledger.offer(event(4)) is None  # the re-creation comes first: not failed
    apply(ledger, ledger.next_ready())  # type: ignore[arg-type]
    assert ledger.next_ready() == event(4)


def test_a_change_queued_behind_a_deletion_fails_once_the_deletion_is_applied() -> None:
    ledger = EventLedger(UserState(exists=True, version=1, org_id="org1", role="member"))
    ledger.offer(event(3))
    ledger.offer(event(2, "deleted"))
    apply(ledger, ledger.next_ready())  # type: ignore[arg-type]
    assert not_found(ledger.outcome("e3")) and not ledger.has_pending()


def test_a_change_to_a_user_never_created_keeps_its_grace() -> None:
    ledger = EventLedger(NOBODY)
    assert ledger.offer(event(1)) is None and ledger.offer(event(2)) is None
    assert ledger.is_holding()  # the creation may be on its way


def test_a_change_after_a_failed_creation_fails_at_once() -> None:
    ledger = EventLedger(NOBODY)
    creation = event(1, "created")
    ledger.offer(creation)
    ledger.finish(
        creation,
        EventOutcome(event_id="e1", version=1, status="failed", error_type="DuplicateEmail"),
        NOBODY,
    )
    assert not_found(ledger.offer(event(2)))


def test_runs_recorded_before_these_rules_replay_with_the_old_ones() -> None:
    # A workflow history from before must replay to the same commands: reused ids are answered
    # as duplicates, a change to a deleted user is held for its grace.
    ledger = EventLedger(
        UserState(exists=True, version=3, org_id="org3", role="admin"), legacy=True
    )
    first = event(4)
    assert ledger.offer(first) is None
    assert ledger.offer(first.model_copy(update={"role": "admin"})) is None
    apply(ledger, first)
    assert ledger.offer(first.model_copy(update={"role": "admin"})) == ledger.outcome("e4")
    applied_row = UserState(exists=True, version=5, org_id="o", role="member", applied_event="e5")
    assert EventLedger(applied_row, legacy=True).offer(event(6, event_id="e5")) is None
    gone = EventLedger(UserState(exists=False, version=2, applied_event="e2"), legacy=True)
    assert gone.offer(event(3)) is None and gone.is_holding()


def reuse_of(e: UserEvent, change: str) -> UserEvent:
    """``e``'s id on other content: an app bug (or a reused id) the ledger must refuse."""
    if change == "version":
        return e.model_copy(update={"version": e.version + 100})
    if change == "kind":
        return e.model_copy(update={"kind": "moved" if e.kind != "moved" else "role_changed"})
    return e.model_copy(update={"role": "admin", "org_id": "elsewhere"})


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[UserEvent], list[UserEvent]]:
    """A realistic life of one user and a delivery order with duplicates, shuffled.

    Realistic: versions come from the App DB row, so a user is created before it changes, and
    after a deletion the next event (if any) is a re-creation. Some event ids are delivered
    again later with other content (after their first delivery: the first one is the event).
    """
    count = draw(st.integers(1, 30))
    events, exists = [], False
    for version in range(1, count + 1):
        kind = draw(st.sampled_from(["role_changed", "moved", "deleted"])) if exists else "created"
        events.append(event(version, kind))
        exists = kind != "deleted"
    deliveries = events + draw(st.lists(st.sampled_from(events), max_size=15))
    deliveries = draw(st.permutations(deliveries))
    for _ in range(draw(st.integers(0, 5))):
        original = draw(st.sampled_from(events))
        first = next(i for i, d in enumerate(deliveries) if d.event_id == original.event_id)
        at = draw(st.integers(first + 1, len(deliveries)))
        change = draw(st.sampled_from(["version", "kind", "membership"]))
        deliveries.insert(at, reuse_of(original, change))
    return events, deliveries


@settings(max_examples=400, deadline=None)
@given(histories(), st.data())
def test_ledger_matches_the_model(
    history: tuple[list[UserEvent], list[UserEvent]], data: st.DataObject
) -> None:
    events, deliveries = history
    ledger = EventLedger(NOBODY)
    decided: list[UserEvent] = []
    for delivered in deliveries:
        outcome = ledger.offer(delivered)
        # The model: a delivery whose id names another event's content is refused, whenever it
        # comes (queued, running or decided), and changes nothing.
        assert conflicts(outcome) == (delivered not in events)
        # The workflow may get to apply between any two deliveries, or not.
        while data.draw(st.booleans()) and (ready := ledger.next_ready()) is not None:
            apply(ledger, ready)
            decided.append(ready)
    while (ready := ledger.next_ready()) is not None:
        apply(ledger, ready)
        decided.append(ready)

    # Nothing is left held: every change found its user.
    assert ledger.expire_held() is None and not ledger.has_pending()
    # One at a time, strictly in version order, each event id at most once.
    versions = [e.version for e in decided]
    assert versions == sorted(set(versions))
    # The model: the user ends as the highest version says, whatever the delivery order.
    highest = events[-1]
    assert decided[-1] == highest
    assert ledger.state.version == highest.version
    assert ledger.state.exists == (highest.kind != "deleted")
    if highest.kind != "deleted":
        assert (ledger.state.org_id, ledger.state.role) == (highest.org_id, highest.role)
    # Every event is decided: applied if taken, otherwise a recorded stale no-op.
    for e in events:
        outcome = ledger.outcome(e.event_id)
        assert outcome is not None
        assert outcome.status == ("applied" if e in decided else "stale")


@st.composite
def after_a_deletion(draw: st.DrawFn) -> tuple[int, list[UserEvent], int | None]:
    """Changes an app sends for a user deleted at ``deleted``, maybe around a re-creation.

    Returns the deletion's version, the events after it (consecutive versions, shuffled) and
    the version of the re-creation among them, if any.
    """
    deleted = draw(st.integers(2, 10))
    count = draw(st.integers(1, 8))
    recreated = draw(st.none() | st.integers(deleted + 1, deleted + count))
    tail = [
        event(v, "created" if v == recreated else draw(st.sampled_from(["role_changed", "moved"])))
        for v in range(deleted + 1, deleted + count + 1)
    ]
    return deleted, draw(st.permutations(tail)), recreated


@settings(max_examples=300, deadline=None)
@given(after_a_deletion(), st.data())
def test_changes_to_a_deleted_user_never_wait_out_the_grace(
    case: tuple[int, list[UserEvent], int | None], data: st.DataObject
) -> None:
    deleted, deliveries, recreated = case
    ledger = deleted_at(deleted)
    for delivered in deliveries:
        ledger.offer(delivered)
        while data.draw(st.booleans()) and (ready := ledger.next_ready()) is not None:
            apply(ledger, ready)
    while (ready := ledger.next_ready()) is not None:
        apply(ledger, ready)
    # Once every event is in, none is left for the grace timer: each was decided at once.
    assert not ledger.has_pending()
    for e in deliveries:
        outcome = ledger.outcome(e.event_id)
        assert outcome is not None
        if recreated is not None and e.version >= recreated:
            # The re-created user takes its later changes (or a newer one overtook them).
            assert outcome.status in ("applied", "stale")
        else:
            # Before the re-creation (or with none) the user is gone: not found, or overtaken
            # by the re-creation if that was applied first.
            assert not_found(outcome) or (recreated is not None and outcome.status == "stale")
    assert ledger.state.exists == (recreated is not None)
    if recreated is not None:
        highest = max(deliveries, key=lambda e: e.version)
        assert ledger.outcome(highest.event_id).status == "applied"  # type: ignore[union-attr]
        assert (ledger.state.version, ledger.state.org_id) == (highest.version, highest.org_id)


def test_a_cancelled_ledger_fails_what_is_pending_and_refuses_what_comes_later() -> None:
    ledger = EventLedger(NOBODY)
    queued = event(1, "created")
    assert ledger.offer(queued) is None
    ledger.abandon("Cancelled", "rolled back", refuse_later=True)
    assert ledger.outcome("e1") is not None and ledger.outcome("e1").error_type == "Cancelled"  # type: ignore[union-attr]
    late = ledger.offer(event(2))
    assert late is not None and (late.status, late.error_type) == ("failed", "Cancelled")
    assert not ledger.has_pending() and ledger.outcome("e2") == late
    # Without ``refuse_later`` (a cancel after the events were offered) later ones would queue.
    plain = EventLedger(NOBODY)
    plain.abandon("Cancelled", "rolled back")
    assert plain.offer(event(1, "created")) is None
