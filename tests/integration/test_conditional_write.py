"""An event's one write step on the real engines: conditional on a predicted state
(``only_if``), recording the event on the App DB row in the same transaction (``record``).

An event's write carries the state the workflow expects SpiceDB to hold (and will restore on a
rollback). The write must go through only on exactly that state, write nothing otherwise, and
recognise its own earlier attempt when retried. The row is brought to the event before SpiceDB
is written, so a row that refuses the event refuses it with nothing written, and a SpiceDB
refusal rolls the row back.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest
from temporalio.testing import ActivityEnvironment

import activities.memberships
from activities.memberships import MembershipActivities
from spicesync.errors import MarkerMoved, SupersededWrite, UserRowMissing
from spicesync.models import (
    Membership,
    MembershipsSnapshot,
    UserEvent,
    WriteMembershipsInput,
    WriteMembershipsResult,
)
from spicesync.spicedb import SpiceDBClient
from tests.integration.conftest import (
    Faults,
    Pipeline,
    grant_outside_spicesync,
    relationships_of,
    revoke_all,
    user_row,
)

pytestmark = pytest.mark.integration

Write = Callable[[WriteMembershipsInput], Awaitable[WriteMembershipsResult]]


@pytest.fixture
def write(pipeline: Pipeline) -> Write:
    """The write step as a worker runs it (one activities object), on the real engines."""
    activities = MembershipActivities(pipeline.spicedb, pipeline.pool)
    env = ActivityEnvironment()

    async def run(request: WriteMembershipsInput) -> WriteMembershipsResult:
        return await env.run(activities.write_memberships, request)

    return run


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The users whose SpiceDB state the write step reads (each read still goes to SpiceDB)."""
    seen: list[str] = []
    real = activities.memberships.read_user_snapshot

    async def counted(client: SpiceDBClient, user_id: str) -> MembershipsSnapshot:
        seen.append(user_id)
        return await real(client, user_id)

    monkeypatch.setattr(activities.memberships, "read_user_snapshot", counted)
    return seen


async def _row(pipeline: Pipeline) -> str:
    """A user row of this test's own (the write claims it), never written to SpiceDB."""
    user_id = uuid.uuid4()
    await pipeline.pool.execute(
        "INSERT INTO users (id, email, name, org_id, role) VALUES ($1, $2, 'C', 'org-c', 'member')",
        user_id,
        f"c-{user_id.hex[:12]}@example.com",
    )
    return str(user_id)


async def _claimed_at(pipeline: Pipeline, user_id: str) -> object:
    return await pipeline.pool.fetchval(
        "SELECT permissions_written_at FROM users WHERE id = $1", uuid.UUID(user_id)
    )


def _replace_with(user_id: str, org: str, only_if: MembershipsSnapshot) -> WriteMembershipsInput:
    return WriteMembershipsInput(
        user_id=user_id,
        remove=list(only_if.memberships),
        add=[Membership(user_id=user_id, org_id=org, role="admin")],
        expected_marker=only_if.marker,
        remove_marker=only_if.marker,
        set_marker=(only_if.marker or 0) + 1,
        event_id=f"{user_id}:test",
        only_if=only_if,
    )


async def test_a_write_on_the_predicted_state_lands_once_and_its_retry_gets_a_token(
    pipeline: Pipeline, write: Write
) -> None:
    user_id = await _row(pipeline)
    request = _replace_with(user_id, "org-c", MembershipsSnapshot(memberships=[], marker=None))
    first = await write(request)
    assert first.found is None and first.zed_token
    assert await relationships_of(pipeline.spicedb, user_id) == [("org-c", "admin")]
    assert await _claimed_at(pipeline, user_id) is not None
    # The same write again, as a retry after a lost result sends it: SpiceDB no longer holds
    # ``only_if`` but holds this write's own marker, so it is this write, landed.
    again = await write(request)
    assert again.found is None and again.zed_token
    assert await relationships_of(pipeline.spicedb, user_id) == [("org-c", "admin")]


async def test_a_write_on_another_state_writes_nothing_and_returns_what_spicedb_holds(
    pipeline: Pipeline, write: Write
) -> None:
    user_id = await _row(pipeline)
    # Something else wrote the user first: a grant of its own, no marker.
    grant = Membership(user_id=user_id, org_id="org-other", role="member")
    await grant_outside_spicesync(pipeline.spicedb, grant)
    await pipeline.pool.execute(
        "UPDATE users SET permissions_written_at = NULL WHERE id = $1", uuid.UUID(user_id)
    )
    predicted = MembershipsSnapshot(memberships=[], marker=None)
    result = await write(_replace_with(user_id, "org-c", predicted))
    assert result.zed_token == ""
    assert result.found == MembershipsSnapshot(memberships=[grant], marker=None)
    assert await relationships_of(pipeline.spicedb, user_id) == [("org-other", "member")]
    # The row's claim was rolled back with the write that did not happen.
    assert await _claimed_at(pipeline, user_id) is None
    # Planned again from what SpiceDB holds, it goes through, and replaces the grant.
    assert result.found is not None
    replanned = await write(_replace_with(user_id, "org-c", result.found))
    assert replanned.found is None and replanned.zed_token
    assert await relationships_of(pipeline.spicedb, user_id) == [("org-c", "admin")]


def _recorded(user_id: str, version: int, role: str = "admin") -> WriteMembershipsInput:
    """A created user's first write, recording the event on its row in the same transaction."""
    event = UserEvent(
        event_id=f"{user_id}:role_changed:v{version}",
        user_id=user_id,
        version=version,
        kind="role_changed",
        org_id="org-c",
        role=role,
    )
    predicted = MembershipsSnapshot(memberships=[], marker=None)
    return _replace_with(user_id, "org-c", predicted).model_copy(
        update={"set_marker": version, "record": event}
    )


async def test_the_write_records_the_event_on_the_row_once_even_when_retried(
    pipeline: Pipeline, write: Write
) -> None:
    user_id = await _row(pipeline)
    request = _recorded(user_id, 2)
    first = await write(request)
    row = await user_row(pipeline.pool, user_id)
    assert row is not None and (row["version"], row["role"], row["sync_status"]) == (
        2,
        "admin",
        "synced",
    )
    assert request.record is not None
    assert row["zed_token"] == first.zed_token and row["applied_event"] == request.record.event_id
    # A retry after a lost result: SpiceDB holds exactly this write, so it landed; the row
    # already records the event (the first attempt committed it), so it is left as it is.
    again = await write(request)
    row = await user_row(pipeline.pool, user_id)
    assert again.zed_token and again.found is None
    assert row is not None and row["zed_token"] == first.zed_token
    # Had the first attempt's commit failed, the row would be pending still: recorded now.
    await pipeline.pool.execute(
        "UPDATE users SET version = 1, role = 'member', applied_event = NULL, zed_token = NULL,"
        " sync_status = 'pending' WHERE id = $1",
        uuid.UUID(user_id),
    )
    third = await write(request)
    row = await user_row(pipeline.pool, user_id)
    assert row is not None and (row["version"], row["role"], row["zed_token"]) == (
        2,
        "admin",
        third.zed_token,
    )
    assert await relationships_of(pipeline.spicedb, user_id) == [("org-c", "admin")]


async def test_a_row_that_refuses_the_event_leaves_spicedb_unwritten(
    pipeline: Pipeline, write: Write
) -> None:
    missing = str(uuid.uuid4())  # no row at all
    with pytest.raises(UserRowMissing):
        await write(_recorded(missing, 2))
    assert await relationships_of(pipeline.spicedb, missing) == []
    newer = await _row(pipeline)
    await pipeline.pool.execute("UPDATE users SET version = 5 WHERE id = $1", uuid.UUID(newer))
    with pytest.raises(SupersededWrite):
        await write(_recorded(newer, 2))
    assert await relationships_of(pipeline.spicedb, newer) == []
    row = await user_row(pipeline.pool, newer)
    assert row is not None and (row["version"], row["role"]) == (5, "member")


async def test_a_spicedb_refusal_rolls_the_row_back(pipeline: Pipeline, write: Write) -> None:
    user_id = await _row(pipeline)
    # Its precondition expects a marker SpiceDB does not hold: SpiceDB refuses the whole write.
    request = _recorded(user_id, 2).model_copy(update={"only_if": None, "expected_marker": 1})
    with pytest.raises(MarkerMoved):
        await write(request)
    row = await user_row(pipeline.pool, user_id)
    assert row is not None and (row["version"], row["role"], row["sync_status"]) == (
        1,
        "member",
        "pending",
    )
    assert row["permissions_written_at"] is None
    assert await relationships_of(pipeline.spicedb, user_id) == []


async def test_a_retry_takes_only_its_own_exact_write_for_landed(
    pipeline: Pipeline, write: Write
) -> None:
    """A retry finds this write's marker, but also a membership it did not write (a backfill
    that wrote after the first attempt's row claim rolled back): not landed, plan again."""
    user_id = await _row(pipeline)
    request = _replace_with(user_id, "org-c", MembershipsSnapshot(memberships=[], marker=None))
    assert (await write(request)).found is None
    stray = Membership(user_id=user_id, org_id="org-stray", role="member")
    await grant_outside_spicesync(pipeline.spicedb, stray)
    again = await write(request)
    assert again.zed_token == "" and again.found is not None
    assert again.found.marker == request.set_marker
    assert sorted(m.org_id for m in again.found.memberships) == ["org-c", "org-stray"]


async def test_a_write_on_nothing_is_checked_in_the_write_itself_without_a_read(
    pipeline: Pipeline, write: Write, reads: list[str]
) -> None:
    """A new user's write (``only_if``: SpiceDB holds nothing of the user) carries that as
    preconditions: it lands without reading the user first; the state is read only when
    SpiceDB does hold something of the user (then nothing is written)."""
    new = await _row(pipeline)
    landed = await write(_recorded(new, 2))
    assert landed.found is None and landed.zed_token
    assert await relationships_of(pipeline.spicedb, new) == [("org-c", "admin")]
    row = await user_row(pipeline.pool, new)
    assert row is not None and (row["version"], row["zed_token"]) == (2, landed.zed_token)
    assert reads == []
    # A user SpiceDB already holds a membership of (no marker: a write outside spicesync).
    held = await _row(pipeline)
    grant = Membership(user_id=held, org_id="org-held", role="admin")
    await grant_outside_spicesync(pipeline.spicedb, grant)
    result = await write(_recorded(held, 2))
    assert result.zed_token == ""
    assert result.found == MembershipsSnapshot(memberships=[grant], marker=None)
    assert reads == [held]
    row = await user_row(pipeline.pool, held)
    assert row is not None and (row["version"], row["role"]) == (1, "member")
    assert await relationships_of(pipeline.spicedb, held) == [("org-held", "admin")]


async def test_a_marker_alone_is_something_held(
    pipeline: Pipeline, write: Write, reads: list[str]
) -> None:
    """Memberships gone but the marker left (a user revoked by hand): not nothing; the write
    on nothing writes nothing and returns the marker it found."""
    user_id = await _row(pipeline)
    first = _replace_with(user_id, "org-c", MembershipsSnapshot(memberships=[], marker=None))
    assert (await write(first)).found is None
    await revoke_all(pipeline.spicedb, user_id)
    # Without the marker check a plain write would not look at the marker: only_if does.
    result = await write(_recorded(user_id, 2).model_copy(update={"check_marker": False}))
    assert result.found == MembershipsSnapshot(memberships=[], marker=first.set_marker)
    assert reads == [user_id]


async def test_a_state_that_differs_goes_before_a_row_that_refuses(
    pipeline: Pipeline, write: Write
) -> None:
    """A row holding a newer version refuses the event, but SpiceDB holds something else than
    predicted: as when the write read first, what SpiceDB holds is returned to plan from."""
    user_id = await _row(pipeline)
    await pipeline.pool.execute("UPDATE users SET version = 5 WHERE id = $1", uuid.UUID(user_id))
    grant = Membership(user_id=user_id, org_id="org-other", role="member")
    await grant_outside_spicesync(pipeline.spicedb, grant)
    result = await write(_recorded(user_id, 2))
    assert result.found == MembershipsSnapshot(memberships=[grant], marker=None)
    row = await user_row(pipeline.pool, user_id)
    assert row is not None and (row["version"], row["role"]) == (5, "member")


async def test_a_retry_of_a_committed_write_is_judged_by_its_own_write_not_the_row_again(
    pipeline: Pipeline, write: Write, faults: Faults
) -> None:
    """The first attempt landed and committed, its result lost; since then a trigger refuses
    any change of the row for good. The retry recognises its own write in SpiceDB and leaves
    the row alone (as a read-first write does), instead of failing the event with SpiceDB
    written and nothing to restore it."""
    user_id = await _row(pipeline)
    request = _recorded(user_id, 2)
    first = await write(request)
    await faults.inject(user_id, "UPDATE", "23514")
    again = await write(request)
    assert again.found is None and again.zed_token
    row = await user_row(pipeline.pool, user_id)
    assert row is not None and (row["version"], row["zed_token"]) == (2, first.zed_token)
    assert await relationships_of(pipeline.spicedb, user_id) == [("org-c", "admin")]
