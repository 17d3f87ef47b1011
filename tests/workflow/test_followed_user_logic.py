"""Follow mode's per-user workflow on the time-skipping server, activities replaced by recorders."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from spicesync.client import FollowSyncFailed, deliver_change, user_changed
from spicesync.constants import (
    FOLLOWED_USER_WORKFLOW,
    USER_CHANGED_SIGNAL,
    followed_user_workflow_id,
)
from spicesync.errors import AppDBUnavailable, MarkerChanged, RowUnmappable, SchemaMismatch
from spicesync.models import (
    FollowedUserInput,
    RecordFollowFailureInput,
    ResumeInput,
    SyncFollowedUserInput,
    SyncFollowedUserResult,
    UserChangedInput,
)
from starters.repair import rollback
from workflows.followed_user import FollowedUserWorkflow
from workflows.user_sync import LAST_ERROR, STAGE, USER_ID

Behaviour = Callable[[int], Awaitable[None]]


class FakeFollow:
    """Stand-ins for the two activities: count syncs, fail or block when told to."""

    def __init__(self, version: int | None = 1, **behaviour: Behaviour) -> None:
        self.syncs: list[SyncFollowedUserInput] = []
        self.attempts = 0
        # Per attempt: whether it ran as a local activity (inside the workflow task).
        self.local: list[bool] = []
        self.failures: list[RecordFollowFailureInput] = []
        self.version = version
        self._behaviour = behaviour

    @activity.defn(name="sync_followed_user")
    async def sync_followed_user(self, request: SyncFollowedUserInput) -> SyncFollowedUserResult:
        self.attempts += 1
        self.local.append(activity.info().is_local)
        if "sync" in self._behaviour:
            await self._behaviour["sync"](self.attempts)
        self.syncs.append(request)
        return SyncFollowedUserResult(
            status="synced",
            row_exists=True,
            version=self.version,
            added=1,
            marker=len(self.syncs),
            zed_token=f"token-{len(self.syncs)}",
        )

    @activity.defn(name="record_follow_failure")
    async def record_follow_failure(self, request: RecordFollowFailureInput) -> None:
        if "record" in self._behaviour:
            await self._behaviour["record"](len(self.failures) + 1)
        self.failures.append(request)

    def activities(self) -> list[Any]:
        return [self.sync_followed_user, self.record_follow_failure]


def fail_first(times: int, error: Exception) -> Behaviour:
    async def behaviour(attempt: int) -> None:
        if attempt <= times:
            raise error

    return behaviour


def held_after_a_failed_local_try(started: asyncio.Event, release: asyncio.Event) -> Behaviour:
    """The local try fails (a moved marker), so the sync goes on as a normal activity, which
    may take as long as it likes: it sets ``started`` and waits for ``release``."""

    async def behaviour(attempt: int) -> None:
        if attempt == 1:
            raise MarkerChanged("the marker moved")
        if attempt == 2:
            started.set()
            await release.wait()

    return behaviour


class Harness:
    def __init__(self, env: WorkflowEnvironment, task_queue: str, uid: str) -> None:
        self.env, self.task_queue, self.uid = env, task_queue, uid

    @property
    def client(self) -> Client:
        return self.env.client

    def handle(self) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(followed_user_workflow_id(self.uid))

    async def signal(self, version: int | None = None, idle: timedelta | None = None) -> None:
        await deliver_change(
            UserChangedInput(user_id=self.uid, version=version),
            client=self.client,
            task_queue=self.task_queue,
            idle=idle,
        )

    async def applied(self, version: int | None = None, idle: timedelta | None = None) -> Any:
        # The test server skips time only while a client awaits a workflow result, not an
        # update: move its clock along while this caller waits (retry backoffs).
        waiting = asyncio.ensure_future(
            user_changed(
                self.uid,
                version,
                wait="applied",
                client=self.client,
                task_queue=self.task_queue,
                idle=idle,
            )
        )
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.2)
            if not waiting.done():
                await self.env.sleep(timedelta(seconds=10))
        return waiting.result()

    async def attributes(self) -> tuple[object, object]:
        try:
            found = (await self.handle().describe()).typed_search_attributes
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            return None, None  # not started yet
        return found.get(STAGE), found.get(LAST_ERROR)


async def running(
    env: WorkflowEnvironment, task_queue: str, fake: FakeFollow
) -> AsyncIterator[Harness]:
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[FollowedUserWorkflow],
        activities=fake.activities(),
    ):
        yield Harness(env, task_queue, str(uuid.uuid4()))


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(600):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def replays(handle: WorkflowHandle[Any, Any]) -> bool:
    """Whether the run's history replays on this code (paths no recording covers)."""
    history = await handle.fetch_history()
    result = await Replayer(
        workflows=[FollowedUserWorkflow], data_converter=pydantic_data_converter
    ).replay_workflow(history, raise_on_replay_failure=False)
    return result.replay_failure is None


async def test_changes_during_a_sync_coalesce_into_one_next_sync(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    fake = FakeFollow(sync=held_after_a_failed_local_try(started, release))
    async for h in running(time_skipping_env, task_queue, fake):
        await h.signal()
        await asyncio.wait_for(started.wait(), 30)
        # A sync that may last is shown, with what sent it out of the workflow task.
        assert await h.attributes() == ("syncing", "MarkerChanged")
        for _ in range(10):
            await h.signal()
        # A caller that needs the result of a sync that began after its change.
        waiting = asyncio.ensure_future(h.applied())
        await asyncio.sleep(0.5)
        assert not waiting.done()
        release.set()
        outcome = await waiting
        assert (outcome.status, outcome.zed_token) == ("synced", "token-2")
        assert await h.attributes() == ("idle", None)
        assert await replays(h.handle())  # a local try, then a normal activity
    assert len(fake.syncs) == 2
    # The coalesced sync is healthy again: tried locally first, like every sync.
    assert fake.local == [True, False, True]


async def test_a_healthy_sync_runs_inside_the_workflow_task_and_shows_no_stage(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow()
    async for h in running(time_skipping_env, task_queue, fake):
        assert (await h.applied()).status == "synced"
        history = await h.handle().fetch_history()
        assert not [
            e for e in history.events if e.HasField("activity_task_scheduled_event_attributes")
        ]
        assert [e for e in history.events if e.HasField("marker_recorded_event_attributes")]
        # Over before anyone could look: no stage written. The id that finds the run came with
        # its start, so the workflow upserted nothing of spicesync's.
        assert await h.attributes() == (None, None)
        assert (await h.handle().describe()).typed_search_attributes.get(USER_ID) == h.uid
        assert _spicesync_upserts(history) == []
    assert fake.local == [True]


async def test_a_run_started_without_its_id_writes_it_once_its_sync_is_done(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    # As an older client starts it: no search attributes with the start.
    fake = FakeFollow()
    async for h in running(time_skipping_env, task_queue, fake):
        await h.client.start_workflow(
            FOLLOWED_USER_WORKFLOW,
            FollowedUserInput(user_id=h.uid),
            id=followed_user_workflow_id(h.uid),
            task_queue=task_queue,
            start_signal=USER_CHANGED_SIGNAL,
            start_signal_args=[UserChangedInput(user_id=h.uid)],
        )

        async def identified(h: Harness = h) -> bool:
            found = (await h.handle().describe()).typed_search_attributes
            return found.get(USER_ID) == h.uid

        # Written as the run waits for its next change, not only when it closes.
        await eventually(identified)
        assert (await h.handle().describe()).status == WorkflowExecutionStatus.RUNNING
        history = await h.handle().fetch_history()
        assert _spicesync_upserts(history) == [["SpicesyncUserId"]]
    assert fake.local == [True]


def _spicesync_upserts(history: Any) -> list[list[str]]:
    """The names in each upsert of spicesync's search attributes (not the SDK's patch upserts)."""
    upserts = [
        list(e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields)
        for e in history.events
        if e.HasField("upsert_workflow_search_attributes_event_attributes")
    ]
    return [names for names in upserts if any(n.startswith("Spicesync") for n in names)]


async def test_a_version_already_synced_needs_no_sync(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow(version=5)
    async for h in running(time_skipping_env, task_queue, fake):
        assert (await h.applied(5)).status == "synced"
        await h.signal(4)
        await h.signal(5)
        late = await h.applied(3)
        assert (late.status, late.version, late.zed_token) == ("skipped", 5, "token-1")
        assert (await h.applied(6)).status == "synced"
        # A change without a version always syncs.
        assert (await h.applied()).zed_token == "token-3"
    assert len(fake.syncs) == 3


async def test_transient_failures_and_a_moved_marker_retry(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow(sync=fail_first(3, MarkerChanged("the marker moved")))
    async for h in running(time_skipping_env, task_queue, fake):
        assert (await h.applied()).status == "synced"
    assert fake.attempts == 4 and not fake.failures
    # One local try, then the step's retry policy on a normal activity.
    assert fake.local == [True, False, False, False]


async def test_a_permanent_failure_is_recorded_and_the_next_change_tries_again(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow(sync=fail_first(1, RowUnmappable("relationships[0].resource: bad id")))
    async for h in running(time_skipping_env, task_queue, fake):
        with pytest.raises(FollowSyncFailed) as failed:
            await h.applied(1)
        assert failed.value.outcome.error_type == "RowUnmappable"
        assert [(f.error_type, f.message) for f in fake.failures] == [
            ("RowUnmappable", "relationships[0].resource: bad id")
        ]
        assert await h.attributes() == ("failed", "RowUnmappable")
        # Not retried as is: one (local) attempt, then the next change syncs again.
        assert fake.attempts == 1 and fake.local == [True]
        assert (await h.applied(1)).status == "synced"
        assert await h.attributes() == ("idle", None)


async def test_a_refused_sync_is_shown_while_its_failure_is_being_recorded(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    postgres_back = asyncio.Event()

    async def record_while_postgres_is_down(_attempt: int) -> None:
        if not postgres_back.is_set():
            raise AppDBUnavailable("PostgreSQL unavailable")

    fake = FakeFollow(
        sync=fail_first(1, RowUnmappable("relationships[0].resource: bad id")),
        record=record_while_postgres_is_down,
    )
    async for h in running(time_skipping_env, task_queue, fake):
        await h.signal()

        async def shown(stage: str, h: Harness = h) -> bool:
            return await h.attributes() == (stage, "RowUnmappable")

        # The local try's refusal showed nothing; its record retries, findable as "syncing".
        await eventually(lambda: shown("syncing"))
        postgres_back.set()
        await h.env.sleep(timedelta(minutes=2))  # the record's next retry
        await eventually(lambda: shown("failed"))
        assert await replays(h.handle())
    assert fake.local == [True] and [f.error_type for f in fake.failures] == ["RowUnmappable"]


async def test_a_rollback_stops_the_sync_in_flight_and_records_nothing(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    fake = FakeFollow(sync=held_after_a_failed_local_try(started, release))
    async for h in running(time_skipping_env, task_queue, fake):
        await h.signal()
        await asyncio.wait_for(started.wait(), 30)
        first = await h.handle().describe()
        # ``spicesync repair rollback --followed-user-id``: the run ends cancelled at once.
        assert await rollback(h.client, h.uid, followed=True) == WorkflowExecutionStatus.CANCELED
        assert not fake.failures  # a cancelled sync is not a failed user
        assert await replays(h.client.get_workflow_handle(first.id, run_id=first.run_id))
        release.set()
        # The next change starts a new run, which syncs the row afresh.
        assert (await h.applied()).status == "synced"
        assert (await h.handle().describe()).run_id != first.run_id
    assert not fake.failures


async def test_a_schema_mismatch_parks_until_resumed(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow(sync=fail_first(1, SchemaMismatch("team#lead not found")))
    async for h in running(time_skipping_env, task_queue, fake):
        waiting = asyncio.ensure_future(h.applied())

        async def parked(h: Harness = h) -> bool:
            return await h.attributes() == ("parked", "SchemaMismatch")

        await eventually(parked)
        assert not waiting.done() and not fake.failures
        resumed = await h.handle().execute_update(FollowedUserWorkflow.resume, ResumeInput())
        assert resumed.resumed
        assert (await waiting).status == "synced"
        again = await h.handle().execute_update(FollowedUserWorkflow.resume, ResumeInput())
        assert not again.resumed
        assert await replays(h.handle())  # parked by a local try's refusal, then resumed
    assert fake.attempts == 2


async def test_continue_as_new_carries_the_synced_version(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow(version=7)
    async for h in running(time_skipping_env, task_queue, fake):
        first = await h.client.start_workflow(
            FOLLOWED_USER_WORKFLOW,
            FollowedUserInput(user_id=h.uid, syncs_per_run=2),
            id=followed_user_workflow_id(h.uid),
            task_queue=task_queue,
        )
        await h.applied()
        await h.applied()

        async def continued(h: Harness = h, first: Any = first) -> bool:
            return (await h.handle().describe()).run_id != first.result_run_id

        await eventually(continued)
        late = await h.applied(7)
        assert (late.status, late.zed_token) == ("skipped", "token-2")
        assert (await h.applied(8)).status == "synced"
    assert len(fake.syncs) == 3


async def test_an_idle_workflow_closes_and_a_later_change_starts_a_new_run(
    own_time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow()
    async for h in running(own_time_skipping_env, task_queue, fake):
        await h.applied()
        assert (await h.handle().describe()).status == WorkflowExecutionStatus.RUNNING
        await h.env.sleep(timedelta(seconds=FollowedUserInput(user_id="x").idle_seconds + 1))
        closed = await h.handle().describe()
        assert closed.status == WorkflowExecutionStatus.COMPLETED
        # Its sync ran inside a workflow task, so no stage was shown and none is written at
        # the close: its status says it closed.
        assert closed.typed_search_attributes.get(STAGE) is None
        await h.signal()

        async def synced_again() -> bool:
            return len(fake.syncs) == 2

        await eventually(synced_again)
        assert (await h.handle().describe()).run_id != closed.run_id


async def _closed(h: Harness) -> bool:
    return (await h.handle().describe()).status == WorkflowExecutionStatus.COMPLETED


async def test_with_no_idle_time_a_run_closes_with_its_sync(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow()
    async for h in running(time_skipping_env, task_queue, fake):
        await h.signal(idle=timedelta(0))
        # Closed by the task that finished the sync: no idle timer was started, so the
        # test server's clock never had to move.
        await eventually(lambda h=h: _closed(h))
        first = await h.handle().describe()
        assert len(fake.syncs) == 1
        history = await h.handle().fetch_history()
        assert not [e for e in history.events if e.HasField("timer_started_event_attributes")]
        # The sync ran inside the run's first workflow task, which closed it too.
        completed = [
            e for e in history.events if e.HasField("workflow_task_completed_event_attributes")
        ]
        assert len(completed) == 1
        # Started by signal-with-start with the id that finds it: nothing upserted.
        assert first.typed_search_attributes.get(USER_ID) == h.uid
        assert _spicesync_upserts(history) == []
        # The next change starts a fresh run, which syncs and closes the same way.
        await h.signal(idle=timedelta(0))
        await eventually(lambda h=h, first=first: _ran_again(h, first.run_id))
        assert len(fake.syncs) == 2


async def _ran_again(h: Harness, run_id: str) -> bool:
    now = await h.handle().describe()
    return now.run_id != run_id and now.status == WorkflowExecutionStatus.COMPLETED


async def test_with_no_idle_time_a_waiting_caller_is_answered_before_the_close(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow(version=3)
    async for h in running(time_skipping_env, task_queue, fake):
        outcome = await h.applied(3, idle=timedelta(0))
        assert (outcome.status, outcome.zed_token) == ("synced", "token-1")
        await eventually(lambda h=h: _closed(h))
        # A new run does not remember the synced version: the same version syncs again.
        assert (await h.applied(3, idle=timedelta(0))).status == "synced"
    assert len(fake.syncs) == 2


async def test_with_no_idle_time_a_failed_user_stays_visible_after_the_close(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow(sync=fail_first(1, RowUnmappable("relationships[0].resource: bad id")))
    async for h in running(time_skipping_env, task_queue, fake):
        with pytest.raises(FollowSyncFailed):
            await h.applied(1, idle=timedelta(0))
        await eventually(lambda h=h: _closed(h))
        assert await h.attributes() == ("failed", "RowUnmappable")
        assert [f.error_type for f in fake.failures] == ["RowUnmappable"]


async def test_a_negative_idle_time_is_refused_before_anything_starts(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow()
    async for h in running(time_skipping_env, task_queue, fake):
        with pytest.raises(ValueError, match="idle"):
            await h.signal(idle=timedelta(seconds=-1))
        with pytest.raises(ValueError, match="idle"):
            await user_changed(
                h.uid,
                wait="applied",
                client=h.client,
                task_queue=task_queue,
                idle=timedelta(seconds=-1),
            )
        assert await h.attributes() == (None, None)  # no workflow was started
    assert not fake.syncs


async def test_a_misaddressed_change_is_refused_by_the_update_validator(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = FakeFollow()
    async for h in running(time_skipping_env, task_queue, fake):
        await h.applied()
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await h.handle().execute_update(
                "sync_change", UserChangedInput(user_id="someone-else"), result_type=None
            )
        assert "another user" in str(refused.value.cause)
        # Refused by the validator: not even written to the history.
        history = await h.handle().fetch_history()
        assert "someone-else" not in history.to_json()
    assert len(fake.syncs) == 1
