"""Per-user saga logic on the time-skipping test server, activities replaced by recorders."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from spicesync.constants import HELD_CHANGE_GRACE, user_workflow_id
from spicesync.errors import (
    AppDBRejectedAfterWrite,
    DuplicateEmail,
    EventIdConflict,
    MarkerMoved,
    SpiceDBRejected,
    SpiceDBUnavailable,
    UserRowMissing,
)
from spicesync.models import (
    ApplyRowInput,
    ApplyRowResult,
    DeliverEventInput,
    InsertCreatedRowInput,
    InsertCreatedRowResult,
    Membership,
    MembershipsSnapshot,
    ReadMembershipsInput,
    ReadUserStateInput,
    ReconcileUserInput,
    RecordRepairInput,
    SubmitEventInput,
    UndoCreatedRowInput,
    UserEvent,
    UserState,
    UserSyncInput,
    WriteMembershipsInput,
    WriteMembershipsResult,
)
from starters.user_events import UserSyncFailed, WaitFor, submit_event
from workflows.user_sync import LAST_ERROR, ORG_ID, STAGE, USER_ID, UserSyncWorkflow

Behaviour = Callable[[int], Awaitable[None]]


class FakeSteps:
    """Stand-ins for the six activities: record each attempt, fail when told to."""

    def __init__(
        self,
        prior: MembershipsSnapshot | None = None,
        *,
        holds_writes: bool = True,
        state: UserState | None = None,
        **behaviour: Behaviour,
    ) -> None:
        # ``prior`` is what the stand-in SpiceDB holds; with ``holds_writes`` the writes change it.
        self.holds_writes = holds_writes
        self.calls: list[str] = []
        self.attempts: dict[str, int] = {}
        self.writes: list[WriteMembershipsInput] = []
        self.prior = prior or MembershipsSnapshot(memberships=[], marker=None)
        # What the stand-in App DB holds for the user (read by ``read_user_state``).
        self.state = state or UserState(exists=False, version=0)
        self._behaviour = behaviour

    async def _step(self, name: str) -> None:
        self.calls.append(name)
        self.attempts[name] = self.attempts.get(name, 0) + 1
        if name in self._behaviour:
            await self._behaviour[name](self.attempts[name])

    async def _after_landing(self) -> None:
        # A ``written`` behaviour stands for a cancel (or a lost worker) after the write landed.
        if "written" in self._behaviour:
            self.attempts["written"] = self.attempts.get("written", 0) + 1
            await self._behaviour["written"](self.attempts["written"])

    @activity.defn(name="read_user_state")
    async def read_user_state(self, _: ReadUserStateInput) -> UserState:
        await self._step("read_user_state")
        return self.state

    @activity.defn(name="insert_created_row")
    async def insert_created_row(self, request: InsertCreatedRowInput) -> InsertCreatedRowResult:
        await self._step("insert_created_row")
        if not request.read_first:
            return InsertCreatedRowResult(created=True, stale=False)
        # As the real activity: a new run's first creation reads the state first, and inserts
        # only if the stand-in App DB has never seen the user.
        if self.state.exists or self.state.version:
            return InsertCreatedRowResult(
                created=False, stale=False, prior=self.state, skipped=True
            )
        return InsertCreatedRowResult(created=True, stale=False, prior=self.state)

    @activity.defn(name="read_memberships")
    async def read_memberships(self, _: ReadMembershipsInput) -> MembershipsSnapshot:
        await self._step("read_memberships")
        return self.prior

    @activity.defn(name="write_memberships")
    async def write_memberships(self, request: WriteMembershipsInput) -> WriteMembershipsResult:
        name = "write_memberships" if request.check_marker else "restore_memberships"
        await self._step(name)
        held = self.prior
        after = _applied(held if request.only_if is None else request.only_if, request)
        if request.only_if is not None and not _same(request.only_if, held):
            if _same(after, held):
                # As the real activity: its own earlier attempt landed; success (the row is
                # recorded again unless that attempt committed it, which the stand-in skips).
                await self._after_landing()
                return WriteMembershipsResult(zed_token=f"token-{len(self.writes)}")
            # As the real activity: a conditional write that finds another state writes nothing.
            return WriteMembershipsResult(found=held)
        if request.record is not None:
            # As the real activity: the row first, so a row that refuses writes nothing.
            await self._step("apply_row")
        self.writes.append(request)
        if self.holds_writes:
            self.prior = after
        if request.check_marker:
            await self._after_landing()
        return WriteMembershipsResult(zed_token=f"token-{len(self.writes)}")

    @activity.defn(name="apply_row")
    async def apply_row(self, _: ApplyRowInput) -> ApplyRowResult:
        await self._step("apply_row")
        return ApplyRowResult(applied=True)

    @activity.defn(name="undo_created_row")
    async def undo_created_row(self, _: UndoCreatedRowInput) -> None:
        await self._step("undo_created_row")

    @activity.defn(name="record_repair")
    async def record_repair(self, _: RecordRepairInput) -> None:
        await self._step("record_repair")

    def activities(self) -> list[Any]:
        return [
            self.read_user_state,
            self.insert_created_row,
            self.read_memberships,
            self.write_memberships,
            self.apply_row,
            self.undo_created_row,
            self.record_repair,
        ]


def _applied(held: MembershipsSnapshot, request: WriteMembershipsInput) -> MembershipsSnapshot:
    kept = [m for m in held.memberships if m not in request.remove]
    return MembershipsSnapshot(
        memberships=kept + [m for m in request.add if m not in kept], marker=request.set_marker
    )


def _same(a: MembershipsSnapshot, b: MembershipsSnapshot) -> bool:
    """As the real activity compares them: the marker, and the memberships in any order."""
    return a.marker == b.marker and {m.model_dump_json() for m in a.memberships} == {
        m.model_dump_json() for m in b.memberships
    }


def fail_first(times: int, error: Exception) -> Behaviour:
    async def behaviour(attempt: int) -> None:
        if attempt <= times:
            raise error

    return behaviour


def always(error: Exception) -> Behaviour:
    async def behaviour(_attempt: int) -> None:
        raise error

    return behaviour


def created(**changes: object) -> UserEvent:
    uid = str(uuid.uuid4())
    fields: dict[str, object] = {
        "event_id": f"{uid}:created:v1",
        "user_id": uid,
        "version": 1,
        "kind": "created",
        "email": "ada@example.com",
        "name": "Ada",
        "org_id": "acme",
        "role": "member",
    } | changes
    return UserEvent(**fields)  # type: ignore[arg-type]


def change_of(event: UserEvent, **changes: object) -> UserEvent:
    return event.model_copy(update={"email": "", "name": "", **changes})


class Harness:
    def __init__(self, env: WorkflowEnvironment, task_queue: str) -> None:
        self.env, self.task_queue = env, task_queue

    async def submit(
        self, event: UserEvent, wait: WaitFor = WaitFor.PERMISSIONS, idle: timedelta | None = None
    ) -> Any:
        # The test server skips time only while a client awaits a workflow result, not an
        # update, so move its clock along while this caller waits (retry backoffs, timers).
        submitted = asyncio.ensure_future(
            submit_event(
                event, wait=wait, client=self.env.client, task_queue=self.task_queue, idle=idle
            )
        )
        while not submitted.done():
            await asyncio.wait({submitted}, timeout=0.2)
            if not submitted.done():
                await self.env.sleep(timedelta(seconds=10))
        return submitted.result()


async def running(
    env: WorkflowEnvironment, task_queue: str, steps: FakeSteps
) -> AsyncIterator[Harness]:
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[UserSyncWorkflow],
        activities=steps.activities(),
        # Deliver a cancel to a heartbeating activity at once, not after the 30 s default.
        default_heartbeat_throttle_interval=timedelta(milliseconds=50),
        max_heartbeat_throttle_interval=timedelta(milliseconds=50),
    ):
        yield Harness(env, task_queue)


async def test_transient_failures_retry_until_success(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(
        insert_created_row=fail_first(3, ConnectionResetError("PostgreSQL went away")),
        write_memberships=fail_first(5, SpiceDBUnavailable("UNAVAILABLE")),
    )
    async for h in running(time_skipping_env, task_queue, steps):
        outcome = await h.submit(created())
    assert outcome.status == "synced" and outcome.zed_token == "token-1"
    assert steps.attempts["insert_created_row"] == 4
    assert steps.attempts["write_memberships"] == 6
    write = steps.writes[0]
    assert write.add == [Membership(user_id=write.user_id, org_id="acme", role="member")]
    assert (write.expected_marker, write.set_marker, write.check_marker) == (None, 1, True)


@pytest.mark.parametrize(
    ("step", "stage"),
    [
        # Local steps: each is tried inside the workflow task first, then runs visibly. (A new
        # run reads the user's state in a step of its own when its first event is a change.)
        ("read_user_state", "reading_row"),
        ("write_memberships", "writing_permissions"),
        # The event is recorded on the row by the write, in its transaction.
        ("apply_row", "writing_permissions"),
    ],
)
async def test_a_local_step_that_keeps_failing_shows_its_stage_then_idle_once_it_succeeds(
    time_skipping_env: WorkflowEnvironment, task_queue: str, step: str, stage: str
) -> None:
    released, retried = asyncio.Event(), asyncio.Event()

    async def until_released(attempt: int) -> None:
        if attempt >= 3:
            # The local try and two attempts of the normal activity have been made.
            retried.set()
        if not released.is_set():
            raise SpiceDBUnavailable("UNAVAILABLE")

    event = created()
    if step == "read_user_state":
        member = Membership(user_id=event.user_id, org_id="acme", role="member")
        steps = FakeSteps(
            MembershipsSnapshot(memberships=[member], marker=1),
            state=UserState(exists=True, version=1, org_id="acme", role="member"),
            **{step: until_released},
        )
        event = change_of(event, kind="role_changed", event_id="promoted", version=2, role="admin")
    else:
        steps = FakeSteps(**{step: until_released})
    async for h in running(time_skipping_env, task_queue, steps):
        submitted = asyncio.ensure_future(h.submit(event))
        handle = h.env.client.get_workflow_handle(user_workflow_id(event.user_id))
        await asyncio.wait_for(retried.wait(), timeout=30)
        shown = (await handle.describe()).typed_search_attributes
        assert (shown.get(STAGE), shown.get(LAST_ERROR)) == (stage, "SpiceDBUnavailable")
        released.set()
        outcome = await submitted
        assert outcome.status == "synced"
        assert (await handle.describe()).typed_search_attributes.get(STAGE) == "idle"


async def test_a_row_that_refuses_the_event_refuses_it_before_spicedb_is_written(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(apply_row=always(UserRowMissing("gone")))
    async for h in running(time_skipping_env, task_queue, steps):
        with pytest.raises(UserSyncFailed) as caught:
            await h.submit(created())
    assert caught.value.error_type == "UserRowMissing"
    assert steps.calls == [
        "insert_created_row",  # a new run's first creation: reads the user's state too
        "write_memberships",  # checks the predicted state itself: no read step before it
        "apply_row",  # the row, in the write's transaction; one attempt: permanent
        "undo_created_row",  # SpiceDB was not written, so only the row is undone
    ]
    assert steps.writes == []


def hang_until_cancelled(reached: asyncio.Event) -> Behaviour:
    """Set ``reached``, then hang until the step is cancelled.

    As ``written`` the write has landed when it hangs; as ``write_memberships`` it has not.
    """

    async def behaviour(_attempt: int) -> None:
        reached.set()
        while True:  # heartbeating is how a normal activity learns it was cancelled
            activity.heartbeat()
            await asyncio.sleep(0.1)

    return behaviour


async def cancel_once(h: Harness, event: UserEvent, started: asyncio.Event) -> None:
    """Submit ``event``, cancel its user's sync once ``started`` is set, wait until cancelled."""
    pending = asyncio.create_task(h.submit(event))
    await asyncio.wait_for(started.wait(), 30)
    await cancel_sync(h, event)
    with pytest.raises(Exception):  # noqa: B017 - the caller learns it did not go through
        await pending


async def cancel_sync(h: Harness, event: UserEvent) -> WorkflowHandle[Any, Any]:
    """Cancel ``event``'s user's sync and wait until it has closed as cancelled."""
    handle = h.env.client.get_workflow_handle(user_workflow_id(event.user_id))
    await handle.cancel()
    for _ in range(300):
        if (await handle.describe()).status == WorkflowExecutionStatus.CANCELED:
            break
        await asyncio.sleep(0.1)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    return handle


async def test_a_cancel_after_the_write_restores_the_prior_state_in_reverse_order(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    landed = asyncio.Event()
    steps = FakeSteps(written=hang_until_cancelled(landed))
    async for h in running(time_skipping_env, task_queue, steps):
        await cancel_once(h, created(), landed)
    # The snapshot was a prediction: the rollback first checks that the write landed.
    assert steps.calls[-3:] == ["read_memberships", "restore_memberships", "undo_created_row"]
    assert [w.check_marker for w in steps.writes] == [True, False]  # landed, then restored
    restore = steps.writes[-1]
    assert restore.add == [] and [m.org_id for m in restore.remove] == ["acme"]
    assert (restore.remove_marker, restore.set_marker) == (1, None)


async def test_a_row_refused_after_the_write_landed_restores_spicedb(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(written=always(AppDBRejectedAfterWrite("a trigger refused the token")))
    async for h in running(time_skipping_env, task_queue, steps):
        with pytest.raises(UserSyncFailed) as caught:
            await h.submit(created())
    assert caught.value.error_type == "AppDBRejectedAfterWrite"
    # Unlike every other refusal, this one follows a landed write: SpiceDB is restored too.
    assert steps.calls[-3:] == ["read_memberships", "restore_memberships", "undo_created_row"]
    assert [w.check_marker for w in steps.writes] == [True, False]


async def test_a_cancel_before_the_write_got_through_leaves_a_grant_that_existed_before(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """The write was planned from a prediction (no grant) that SpiceDB would have refused; it
    was cancelled before it got through, so the rollback must not remove the grant."""
    event = created()
    grant = Membership(user_id=event.user_id, org_id="acme", role="member")
    running_write = asyncio.Event()
    steps = FakeSteps(
        prior=MembershipsSnapshot(memberships=[grant], marker=None),
        write_memberships=hang_until_cancelled(running_write),
    )
    async for h in running(time_skipping_env, task_queue, steps):
        await cancel_once(h, event, running_write)
    assert steps.calls[-2:] == ["read_memberships", "undo_created_row"]
    assert steps.writes == [] and steps.prior.memberships == [grant]


async def test_compensation_keeps_a_grant_that_existed_before(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    event = created()
    grant = Membership(user_id=event.user_id, org_id="acme", role="member")
    landed = asyncio.Event()
    steps = FakeSteps(
        prior=MembershipsSnapshot(memberships=[grant], marker=None),
        written=hang_until_cancelled(landed),
    )
    async for h in running(time_skipping_env, task_queue, steps):
        await cancel_once(h, event, landed)
    restore = steps.writes[-1]
    # SpiceDB #1903: the rollback puts the pre-existing grant back instead of deleting it.
    assert restore.remove == [] and restore.add == [grant]


async def test_refused_write_lands_nothing_so_only_the_row_is_undone(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(write_memberships=always(SpiceDBRejected("INVALID_ARGUMENT")))
    async for h in running(time_skipping_env, task_queue, steps):
        with pytest.raises(UserSyncFailed) as caught:
            await h.submit(created())
    assert caught.value.error_type == "SpiceDBRejected"
    assert steps.attempts["write_memberships"] == 1
    assert steps.calls[-2:] == ["write_memberships", "undo_created_row"]


async def test_duplicate_email_writes_nothing_to_spicedb(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps(insert_created_row=always(DuplicateEmail("taken")))
    async for h in running(time_skipping_env, task_queue, steps):
        with pytest.raises(UserSyncFailed) as caught:
            await h.submit(created())
    assert caught.value.error_type == "DuplicateEmail"
    # Refused by the insert that also read the state: no read step, no second try.
    assert steps.calls == ["insert_created_row"]


async def test_compensation_failures_retry_until_they_succeed(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    landed = asyncio.Event()
    steps = FakeSteps(
        written=hang_until_cancelled(landed),
        # Even a "permanent" error type is retried during compensation: it must finish.
        restore_memberships=fail_first(2, SpiceDBRejected("flaky")),
        undo_created_row=fail_first(4, ConnectionRefusedError("PostgreSQL down")),
    )
    async for h in running(time_skipping_env, task_queue, steps):
        await cancel_once(h, created(), landed)
    assert steps.attempts["restore_memberships"] == 3
    assert steps.attempts["undo_created_row"] == 5


async def test_duplicates_and_stale_events_are_no_ops(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps()
    first = created()
    change = change_of(first, event_id="change-3", kind="role_changed", version=3, role="admin")
    older = change_of(first, event_id="change-2", kind="role_changed", version=2)
    async for h in running(time_skipping_env, task_queue, steps):
        a, b = await asyncio.gather(h.submit(first), h.submit(first))
        assert a == b and a.status == "synced"
        assert (await h.submit(change)).status == "synced"
        assert (await h.submit(older)).status == "stale"
        late = await h.submit(first)  # a late duplicate: the first delivery's outcome
        assert late == a
    # Every write answers with a token of its own, so a duplicate applied again would have
    # answered with another one (``late == a`` above). Attempts are not counted: on a busy box
    # a step's local try may run out of time and carry on as a normal activity, a second
    # attempt of the same write.
    written = {w.event_id for w in steps.writes}
    assert written == {first.event_id, change.event_id}


async def test_invalid_event_is_rejected_by_the_update_validator(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps()
    bad = created(email="not-an-email")
    async for h in running(time_skipping_env, task_queue, steps):
        with pytest.raises(WorkflowUpdateFailedError) as caught:
            # Straight to the workflow, past the starter's own validation.
            await h.env.client.execute_update_with_start_workflow(
                UserSyncWorkflow.submit,
                SubmitEventInput(event=bad),
                start_workflow_operation=WithStartWorkflowOperation(
                    UserSyncWorkflow.run,
                    UserSyncInput(user_id=bad.user_id),
                    id=user_workflow_id(bad.user_id),
                    task_queue=task_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                ),
            )
        assert "email:" in str(caught.value.cause)
    assert "insert_created_row" not in steps.calls


async def test_a_change_for_a_user_that_never_comes_fails_after_its_grace(
    own_time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps()
    orphan = change_of(created(), event_id="orphan", kind="moved", version=2)
    async for h in running(own_time_skipping_env, task_queue, steps):
        assert (await h.submit(orphan, wait=WaitFor.START)).status == "started"
        await h.env.sleep(HELD_CHANGE_GRACE + timedelta(seconds=1))
        with pytest.raises(UserSyncFailed) as caught:
            await h.submit(orphan)  # the duplicate learns the first delivery's outcome
    assert caught.value.error_type == "UserNotFound"
    assert "write_memberships" not in steps.calls


async def test_an_idle_workflow_closes(
    own_time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps()
    event = created()
    async for h in running(own_time_skipping_env, task_queue, steps):
        await h.submit(event)
        handle = h.env.client.get_workflow_handle(user_workflow_id(event.user_id))
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        await h.env.sleep(timedelta(seconds=UserSyncInput(user_id="x").idle_seconds + 1))
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED


async def history_types(handle: WorkflowHandle[Any, Any]) -> list[EventType.ValueType]:
    return [e.event_type async for e in handle.fetch_history_events()]


async def test_with_no_idle_time_a_run_closes_with_its_last_event_and_the_next_starts_afresh(
    own_time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Idle time zero: no idle timer; the run closes in the task that answered its caller, and
    the user's next event starts a run that reads what the App DB holds."""
    steps = FakeSteps()
    event = created()
    moved = change_of(event, event_id="moved", kind="moved", version=2, org_id="globex")
    handle = own_time_skipping_env.client.get_workflow_handle(user_workflow_id(event.user_id))
    async for h in running(own_time_skipping_env, task_queue, steps):
        assert (await h.submit(event, idle=timedelta(0))).status == "synced"
        first = await handle.describe()
        assert first.status == WorkflowExecutionStatus.COMPLETED
        steps.state = UserState(exists=True, version=1, org_id="acme", role="member")
        # Signalled: the caller is answered by the server; the run applies it, then closes.
        assert (await h.submit(moved, wait=WaitFor.START, idle=timedelta(0))).status == "started"
        await handle.result()
        second = await handle.describe()
        assert second.run_id != first.run_id
        assert second.status == WorkflowExecutionStatus.COMPLETED
        assert steps.calls.count("read_user_state") == 1
    assert [w.add[0].org_id for w in steps.writes] == ["acme", "globex"]
    for run_id in (first.run_id, second.run_id):
        types = await history_types(
            own_time_skipping_env.client.get_workflow_handle(handle.id, run_id=run_id)
        )
        assert EventType.EVENT_TYPE_TIMER_STARTED not in types
        # One workflow task per event: the run closes in the task that finished the event.
        assert types.count(EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED) <= 2


async def test_with_no_idle_time_a_change_held_for_its_creation_keeps_the_run_open(
    own_time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A change that arrives before its creation is held on its grace timer, as with an idle
    time; the run closes once the creation came and both are applied."""
    steps = FakeSteps()
    event = created()
    moved = change_of(event, event_id="moved", kind="moved", version=2, org_id="globex")
    handle = own_time_skipping_env.client.get_workflow_handle(user_workflow_id(event.user_id))
    async for h in running(own_time_skipping_env, task_queue, steps):
        assert (await h.submit(moved, wait=WaitFor.START, idle=timedelta(0))).status == "started"
        await h.env.sleep(HELD_CHANGE_GRACE / 2)
        described = await handle.describe()
        assert described.status == WorkflowExecutionStatus.RUNNING
        assert steps.writes == []
        assert (await h.submit(event, idle=timedelta(0))).status == "synced"
        await handle.result()
        assert (await handle.describe()).run_id == described.run_id
        assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in await history_types(handle)
    assert [w.add[0].org_id for w in steps.writes] == ["acme", "globex"]


async def test_with_no_idle_time_a_held_change_whose_creation_never_comes_fails_then_closes(
    own_time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps()
    orphan = change_of(created(), event_id="orphan", kind="moved", version=2)
    handle = own_time_skipping_env.client.get_workflow_handle(user_workflow_id(orphan.user_id))
    async for h in running(own_time_skipping_env, task_queue, steps):
        assert (await h.submit(orphan, wait=WaitFor.START, idle=timedelta(0))).status == "started"
        await h.env.sleep(HELD_CHANGE_GRACE + timedelta(seconds=1))
        await handle.result()
        # Closed: the duplicate starts a new run, which holds it again (the user never came).
        assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    assert steps.writes == []


async def test_a_negative_idle_time_is_refused_before_anything_starts(
    own_time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    event = created()
    async for h in running(own_time_skipping_env, task_queue, FakeSteps()):
        with pytest.raises(ValueError, match="idle"):
            await h.submit(event, idle=timedelta(seconds=-1))
    with pytest.raises(RPCError):
        await own_time_skipping_env.client.get_workflow_handle(
            user_workflow_id(event.user_id)
        ).describe()


async def test_cancellation_compensates_after_the_inflight_write_stops(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    write_running = asyncio.Event()
    steps = FakeSteps(write_memberships=hang_until_cancelled(write_running))
    async for h in running(time_skipping_env, task_queue, steps):
        await cancel_once(h, created(), write_running)
    # The write never got through (it hung before landing): SpiceDB is left as it was.
    assert steps.calls[-2:] == ["read_memberships", "undo_created_row"]
    assert steps.writes == []


async def test_continue_as_new_carries_state_and_dedupe(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps()
    first = created()
    second = change_of(first, event_id="v2", kind="role_changed", version=2, role="admin")
    third = change_of(first, event_id="v3", kind="moved", version=3, org_id="globex")
    async for h in running(time_skipping_env, task_queue, steps):
        handle = await h.env.client.start_workflow(
            UserSyncWorkflow.run,
            UserSyncInput(user_id=first.user_id, events_per_run=2),
            id=user_workflow_id(first.user_id),
            task_queue=task_queue,
        )
        # Started without an event: its first workflow task reads the user's state in a step of
        # its own (a creation that came with that task would read it in its insert instead).
        for _ in range(300):
            kinds = [e.event_type async for e in handle.fetch_history_events()]
            if EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in kinds:
                break
            await asyncio.sleep(0.05)
        await h.submit(first)
        await h.submit(second)  # the run's second event: it continues as new after this
        for _ in range(100):
            if (
                await h.env.client.get_workflow_handle(handle.id).describe()
            ).run_id != handle.result_run_id:
                break
            await asyncio.sleep(0.05)
        described = await h.env.client.get_workflow_handle(handle.id).describe()
        assert described.run_id != handle.result_run_id  # a new run
        again = await h.submit(first)  # remembered across the new run
        assert again.status == "synced" and again.event_id == first.event_id
        assert (await h.submit(second.model_copy(update={"event_id": "late"}))).status == "stale"
        assert (await h.submit(third)).status == "synced"
    assert steps.attempts["insert_created_row"] == 1
    assert steps.attempts["write_memberships"] == 3
    assert steps.attempts["read_user_state"] == 1  # the new run started from the carried state


async def test_a_marker_moved_by_a_backfill_makes_the_event_plan_again_not_fail(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    event = created()
    grant = Membership(user_id=event.user_id, org_id="globex", role="member")
    backfilled = MembershipsSnapshot(memberships=[grant], marker=None)

    async def backfill_wrote_meanwhile(attempt: int) -> None:
        if attempt == 1:
            steps.prior = backfilled
            raise MarkerMoved("moved since the read")

    steps = FakeSteps(write_memberships=backfill_wrote_meanwhile)
    async for h in running(time_skipping_env, task_queue, steps):
        outcome = await h.submit(event)
    assert outcome.status == "synced"
    assert steps.calls == [
        "insert_created_row",
        "write_memberships",  # refused: the marker moved since the state was read
        "write_memberships",  # finds the backfill's state, writes nothing, returns it
        "write_memberships",  # planned from that state, nothing compensated
        "apply_row",
    ]
    final = steps.writes[-1]
    assert final.only_if == backfilled and final.remove == [grant]
    assert [m.org_id for m in final.add] == ["acme"]


async def test_a_repair_waits_for_the_event_in_flight_then_reads_both_stores_afresh(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def held(_attempt: int) -> None:
        started.set()
        await release.wait()

    # The stand-in SpiceDB stays empty, as the stand-in App DB does.
    steps = FakeSteps(apply_row=held, holds_writes=False)
    event = created()
    async for h in running(time_skipping_env, task_queue, steps):
        await h.submit(event, wait=WaitFor.ROW)
        handle = time_skipping_env.client.get_workflow_handle(user_workflow_id(event.user_id))
        repair = asyncio.ensure_future(
            handle.execute_update(UserSyncWorkflow.reconcile, ReconcileUserInput(request_id="r1"))
        )
        await started.wait()
        await asyncio.sleep(0.3)  # room for a wrongly eager repair to start
        assert not repair.done() and "read_user_state" not in steps.calls
        release.set()
        result = await repair
        again = await handle.execute_update(
            UserSyncWorkflow.reconcile, ReconcileUserInput(request_id="r1")
        )
    # The stand-ins say "no user, no relationships": nothing to write, and a repeated request
    # is answered from memory without reading again.
    assert result.action == "consistent" and again == result
    assert steps.calls[-3:] == ["apply_row", "read_user_state", "read_memberships"]


async def test_reused_ids_and_changes_to_a_deleted_user_are_answered_at_once_and_replay(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    steps = FakeSteps()
    first = created()
    gone = change_of(first, event_id="gone", kind="deleted", version=2, org_id="", role="")
    late = change_of(first, event_id="late", kind="role_changed", version=3, role="admin")
    async for h in running(time_skipping_env, task_queue, steps):
        await h.submit(first)
        with pytest.raises(EventIdConflict):
            await h.submit(first.model_copy(update={"role": "admin"}))
        await h.submit(gone)
        with pytest.raises(UserSyncFailed) as caught:
            await h.submit(late)  # the test server's clock moves only while a caller waits
        assert caught.value.error_type == "UserNotFound"
        history = await h.env.client.get_workflow_handle(
            user_workflow_id(first.user_id)
        ).fetch_history()
    assert steps.attempts["write_memberships"] == 2  # the creation and the deletion only
    # No grace timer was started for the change, and the history replays on this code.
    timers = [
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        for e in history.events
        if e.HasField("timer_started_event_attributes")
    ]
    assert timers and HELD_CHANGE_GRACE not in timers  # only idle timers
    replayed = await Replayer(
        workflows=[UserSyncWorkflow], data_converter=time_skipping_env.client.data_converter
    ).replay_workflow(history, raise_on_replay_failure=True)
    assert replayed.replay_failure is None


async def test_events_sent_by_signal_apply_in_version_order(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """``WaitFor.START`` sends the ``deliver`` signal: the events still apply one at a time,
    lowest version first, and an event addressed to another user is dropped."""
    steps = FakeSteps()
    first = created()
    moved = change_of(first, event_id="moved", kind="moved", version=2, org_id="globex")
    async for h in running(time_skipping_env, task_queue, steps):
        # The move comes first; it is held until its creation arrives.
        assert (await h.submit(moved, wait=WaitFor.START)).status == "started"
        assert (await h.submit(first, wait=WaitFor.START)).status == "started"
        handle = h.env.client.get_workflow_handle(user_workflow_id(first.user_id))
        await handle.signal("deliver", DeliverEventInput(event=created(event_id="stranger")))
        assert (await h.submit(moved)).status == "synced"
    assert [w.add[0].org_id for w in steps.writes] == ["acme", "globex"]
    assert steps.calls.count("insert_created_row") == 1


async def test_a_reused_event_id_sent_by_signal_is_not_applied(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A signal cannot be refused: the reuse is found by the workflow, the first event stands,
    and a caller that then waits for the reused delivery learns of the conflict."""
    steps = FakeSteps()
    first = created()
    reused = first.model_copy(update={"role": "admin"})
    async for h in running(time_skipping_env, task_queue, steps):
        assert (await h.submit(first, wait=WaitFor.START)).status == "started"
        assert (await h.submit(reused, wait=WaitFor.START)).status == "started"
        assert (await h.submit(first)).status == "synced"
        with pytest.raises(EventIdConflict):
            await h.submit(reused, wait=WaitFor.ACCEPTED)
    assert [w.add[0].role for w in steps.writes] == ["member"]


async def test_a_first_creation_of_a_user_the_app_db_knows_is_judged_against_its_state(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A creation delivered again after the user's run closed starts a new run: its insert
    finds the user at a newer version, writes nothing, and the event is found stale."""
    steps = FakeSteps(state=UserState(exists=True, version=3, org_id="acme", role="admin"))
    async for h in running(time_skipping_env, task_queue, steps):
        outcome = await h.submit(created())
    assert outcome.status == "stale"
    assert steps.calls == ["insert_created_row"] and steps.writes == []


async def test_a_cancel_during_a_new_runs_first_insert_undoes_its_row(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """The insert that also reads the state runs before the run's ledger exists; a cancel then
    still removes the row it may have written (undo_created_row removes only this event's)."""
    inserting = asyncio.Event()
    steps = FakeSteps(insert_created_row=hang_until_cancelled(inserting))
    async for h in running(time_skipping_env, task_queue, steps):
        await cancel_once(h, created(), inserting)
    assert steps.calls == ["insert_created_row", "undo_created_row"]
    assert steps.writes == []


def block_first_attempt(started: asyncio.Event, go_on: asyncio.Event) -> Behaviour:
    """Hold the step's first attempt until ``go_on`` is set; later attempts run at once."""

    async def behaviour(attempt: int) -> None:
        if attempt == 1:
            started.set()
            await go_on.wait()

    return behaviour


async def test_a_lower_creation_arriving_during_the_first_insert_goes_first(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """The first insert ran for version 3; version 1 arrives while it runs. Version order wins:
    the early row is undone, version 1 applies, then version 3 is inserted again in its turn."""
    started, go_on = asyncio.Event(), asyncio.Event()
    steps = FakeSteps(insert_created_row=block_first_attempt(started, go_on))
    later = created(version=3)
    earlier = created(event_id="first", user_id=later.user_id, version=1, org_id="globex")
    async for h in running(time_skipping_env, task_queue, steps):
        pending = asyncio.ensure_future(h.submit(later))
        await asyncio.wait_for(started.wait(), 30)
        assert (await h.submit(earlier, wait=WaitFor.START)).status == "started"
        go_on.set()
        assert (await pending).status == "synced"
        assert (await h.submit(earlier)).status == "synced"
    assert steps.calls[:3] == ["insert_created_row", "undo_created_row", "insert_created_row"]
    assert [w.add[0].org_id for w in steps.writes] == ["globex", "acme"]
    assert steps.calls.count("insert_created_row") == 3


async def test_a_repair_asked_while_the_first_insert_runs_is_answered_when_cancelled(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Cancelled before the run knew the user's state, with a creation and a repair waiting:
    the row is undone, and both callers are answered (the run closes, nothing hangs)."""
    inserting = asyncio.Event()
    steps = FakeSteps(insert_created_row=hang_until_cancelled(inserting))
    event = created()
    async for h in running(time_skipping_env, task_queue, steps):
        submitted = asyncio.ensure_future(h.submit(event))
        await asyncio.wait_for(inserting.wait(), 30)
        handle = h.env.client.get_workflow_handle(user_workflow_id(event.user_id))
        repair = asyncio.ensure_future(
            handle.execute_update(UserSyncWorkflow.reconcile, ReconcileUserInput(request_id="r"))
        )
        await asyncio.sleep(0.3)  # the repair reaches the workflow and waits for its state
        await handle.cancel()
        assert (await asyncio.wait_for(repair, 30)).error_type == "Cancelled"
        with pytest.raises(UserSyncFailed) as caught:
            await asyncio.wait_for(submitted, 30)
        assert caught.value.error_type == "Cancelled"
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert steps.calls == ["insert_created_row", "undo_created_row"]


async def test_a_cancel_inside_a_signalled_creations_local_insert_undoes_its_row(
    time_skipping_env: WorkflowEnvironment, task_queue: str, patient_local_steps: None
) -> None:
    """A creation delivered by the deliver signal inserts locally; a cancel interrupts a local
    activity where it is (after its commit, perhaps), so the row is undone all the same. A
    re-creation after a delete is inserted in its own turn, not with the run's first read."""
    # The cancel reaches the workflow once its task gives way (up to 8 s while a local activity
    # runs); until then the hanging insert stays a local try (patient_local_steps).
    reached = asyncio.Event()

    async def second_insert_hangs(attempt: int) -> None:
        if attempt >= 2:  # the first is the new run's read of the user's state
            reached.set()
            await asyncio.Event().wait()  # until cancelled

    steps = FakeSteps(
        state=UserState(exists=False, version=3),  # deleted at version 3
        insert_created_row=second_insert_hangs,
    )
    event = created(version=4, event_id="recreated-v4")
    async for h in running(time_skipping_env, task_queue, steps):
        assert (await h.submit(event, wait=WaitFor.START)).status == "started"
        await asyncio.wait_for(reached.wait(), 30)
        history = await (await cancel_sync(h, event)).fetch_history()
    assert steps.calls == ["insert_created_row", "insert_created_row", "undo_created_row"]
    # Both inserts ran locally (the event was in history with its signal): no activity task.
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled == ["undo_created_row"]


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        # Moved to another organization long ago: a late copy of its creation is stale.
        (UserState(exists=True, version=5, org_id="elsewhere", role="member"), "elsewhere"),
        # Deleted since: the creation is stale and the user has no organization.
        (UserState(exists=False, version=5), None),
    ],
)
async def test_a_stale_creation_does_not_leave_the_org_its_start_showed(
    time_skipping_env: WorkflowEnvironment,
    task_queue: str,
    state: UserState,
    shown: str | None,
) -> None:
    """The starter shows a creation's organization with the run's start; where the App DB has
    seen the user, the run shows what the App DB holds instead, before it waits."""
    steps = FakeSteps(state=state)
    event = created()  # org "acme", version 1
    async for h in running(time_skipping_env, task_queue, steps):
        assert (await h.submit(event, wait=WaitFor.START)).status == "started"
        assert (await h.submit(event)).status == "stale"
        handle = h.env.client.get_workflow_handle(user_workflow_id(event.user_id))
        attributes = (await handle.describe()).typed_search_attributes
    assert attributes.get(ORG_ID) == shown
    assert attributes.get(USER_ID) == event.user_id
    assert steps.calls == ["insert_created_row"]  # read with the insert, which wrote nothing
