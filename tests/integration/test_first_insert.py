"""A new run's first creation reads the user's App DB state in its insert, on real PostgreSQL.

A new user's first event is its creation: instead of a read step before it, the insert reads the
user's state in its own transaction and inserts only if the App DB has never seen the user (or
holds just this event's own pending row, from an attempt whose result was lost). Otherwise it
writes nothing and returns the state, for the workflow to judge the event against.
"""

from __future__ import annotations

import uuid

import pytest
from temporalio.testing import ActivityEnvironment

from activities.user_rows import UserRowActivities
from spicesync.errors import DuplicateEmail
from spicesync.models import InsertCreatedRowInput, UserState
from starters.user_events import creation_event
from tests.integration.conftest import Pipeline, new_event, user_row

pytestmark = pytest.mark.integration


async def test_an_unseen_user_is_inserted_and_a_retry_finds_its_own_row(
    pipeline: Pipeline,
) -> None:
    event = creation_event(new_event())
    rows, env = UserRowActivities(pipeline.pool), ActivityEnvironment()
    request = InsertCreatedRowInput(event=event, read_first=True)
    first = await env.run(rows.insert_created_row, request)
    assert (first.created, first.stale, first.skipped) == (True, False, False)
    assert first.prior == UserState(exists=False, version=0)
    row = await user_row(pipeline.pool, event.user_id)
    assert row is not None and (row["sync_status"], row["created_by_event"]) == (
        "pending",
        event.event_id,
    )
    # A retry after a lost result: the pending row is this event's own, so it is the insert.
    again = await env.run(rows.insert_created_row, request)
    assert (again.created, again.skipped) == (True, False)
    assert again.prior is not None and again.prior.unfinished_creation == event.event_id


async def test_a_user_the_app_db_knows_is_left_alone_and_its_state_returned(
    pipeline: Pipeline,
) -> None:
    user = new_event()
    user_id = uuid.UUID(user.user_id)
    await pipeline.pool.execute(
        "INSERT INTO users (id, email, name, org_id, role, version, sync_status)"
        " VALUES ($1, $2, 'K', $3, 'admin', 4, 'synced')",
        user_id,
        user.email,
        user.org_id,
    )
    rows, env = UserRowActivities(pipeline.pool), ActivityEnvironment()
    again = creation_event(user, version=5)
    result = await env.run(
        rows.insert_created_row, InsertCreatedRowInput(event=again, read_first=True)
    )
    assert (result.created, result.stale, result.skipped) == (False, False, True)
    assert result.prior is not None and (result.prior.exists, result.prior.version) == (True, 4)
    row = await user_row(pipeline.pool, user.user_id)
    assert row is not None and (row["version"], row["role"]) == (4, "admin")
    # A deleted user: its tombstone's version, and no row inserted over it.
    gone = new_event()
    await pipeline.pool.execute(
        "INSERT INTO user_tombstones (id, version) VALUES ($1, 3)", uuid.UUID(gone.user_id)
    )
    result = await env.run(
        rows.insert_created_row,
        InsertCreatedRowInput(event=creation_event(gone, version=4), read_first=True),
    )
    assert result.skipped and result.prior == UserState(exists=False, version=3)
    assert await user_row(pipeline.pool, gone.user_id) is None


async def test_a_duplicate_email_refuses_the_insert_with_nothing_written(
    pipeline: Pipeline,
) -> None:
    taken = new_event()
    rows, env = UserRowActivities(pipeline.pool), ActivityEnvironment()
    await env.run(
        rows.insert_created_row, InsertCreatedRowInput(event=creation_event(taken), read_first=True)
    )
    other = new_event(email=taken.email.upper())
    with pytest.raises(DuplicateEmail):
        await env.run(
            rows.insert_created_row,
            InsertCreatedRowInput(event=creation_event(other), read_first=True),
        )
    assert await user_row(pipeline.pool, other.user_id) is None
