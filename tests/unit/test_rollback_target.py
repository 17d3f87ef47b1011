"""What a rollback restores when the steps ran again after a lost workflow task."""

from __future__ import annotations

from spicesync.models import Membership, MembershipsSnapshot, UserEvent, UserState
from workflows.user_sync_helpers import state_before as _state_before

EVENT = UserEvent(event_id="u:role_changed:v3", user_id="u", version=3, kind="role_changed")


def test_a_snapshot_taken_before_the_write_is_restored_as_read() -> None:
    before = MembershipsSnapshot(
        memberships=[Membership(user_id="u", org_id="o", role="member")], marker=2
    )
    assert _state_before(EVENT, before, UserState(exists=True, version=2)) == before


def test_a_snapshot_showing_the_events_own_write_restores_what_the_app_db_had_applied() -> None:
    # The lost attempt already wrote v3 (admin); the App DB still says v2, member.
    seen = MembershipsSnapshot(
        memberships=[Membership(user_id="u", org_id="o", role="admin")], marker=3
    )
    prior = UserState(exists=True, version=2, org_id="o", role="member")
    assert _state_before(EVENT, seen, prior) == MembershipsSnapshot(
        memberships=[Membership(user_id="u", org_id="o", role="member")], marker=2
    )


def test_a_creation_whose_own_write_is_seen_rolls_back_to_nothing() -> None:
    created = EVENT.model_copy(update={"kind": "created", "version": 1})
    seen = MembershipsSnapshot(
        memberships=[Membership(user_id="u", org_id="o", role="admin")], marker=1
    )
    restored = _state_before(created, seen, UserState(exists=False, version=0))
    assert restored == MembershipsSnapshot(memberships=[], marker=None)
