"""Deliver user lifecycle events from application code: what an application installs.

This module is the ``spicesync-client`` distribution's API (docs/packaging.md): it reaches the
user's workflow by its registered names (:data:`~spicesync.constants.USER_SYNC_WORKFLOW` and
its update :data:`~spicesync.constants.SUBMIT_EVENT_UPDATE`), so it imports no workflow code and
an application needs none of the worker's dependencies.

Every event goes to its user's workflow (id ``user-<uuid>``): the first event of a user starts
the workflow, later ones join it, duplicates get the first delivery's outcome. Four ways to wait,
for four kinds of caller:

* ``WaitFor.START``: return once Temporal holds the event durably (signal-with-start: the
  server's answer is enough, no worker is waited for, so a busy worker never slows the caller).
  The user's workflow judges the event later: a reused event id with other content is then
  logged, counted and not applied, and a later call for the same event with another wait
  raises :class:`EventIdConflict`;
* ``WaitFor.ACCEPTED``: return once the user's workflow has taken the event (update-with-start):
  a worker has checked it against earlier deliveries, so a reused event id raises
  :class:`EventIdConflict` here; under load this waits for a free worker;
* ``WaitFor.ROW``: return once the App DB row reflects it (for a creation: the seed's
  "201 Created" moment, before SpiceDB is written);
* ``WaitFor.PERMISSIONS``: return once SpiceDB reflects it too, with the ZedToken, so the
  caller's next permission check can ask for ``at_least_as_fresh`` that token.

A call that Temporal refuses for a passing reason (the server or the connection is down or
overloaded, the user's workflow task is being retried, the workflow closed in the instant the
event arrived) is retried here, with backoff, until ``accept_within`` has passed; then
:class:`EventNotAccepted` is raised. Retrying is safe because delivering an event again is a
no-op, and nothing of an event is written before Temporal has durably accepted it.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateHandle,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from spicesync.constants import (
    DELIVER_EVENT_SIGNAL,
    FOLLOWED_USER_WORKFLOW,
    ORG_ID_ATTRIBUTE,
    SUBMIT_EVENT_UPDATE,
    SYNC_CHANGE_UPDATE,
    USER_CHANGED_SIGNAL,
    USER_ID_ATTRIBUTE,
    USER_SYNC_WORKFLOW,
    followed_user_workflow_id,
    user_workflow_id,
)
from spicesync.errors import EventIdConflict, InvalidUserInput
from spicesync.mapping import valid_user_id
from spicesync.models import (
    CreateUserInput,
    DeliverEventInput,
    EventOutcome,
    FollowedUserInput,
    FollowSyncOutcome,
    SubmitEventInput,
    UserChangedInput,
    UserEvent,
    UserSyncInput,
    WaitStage,
)
from spicesync.settings import Settings, load_settings
from spicesync.temporal import client_and_queue, connect_temporal
from spicesync.validation import validate_event

__all__ = [
    "DEFAULT_ACCEPT_WITHIN",
    "ChangeNotAccepted",
    "EventIdConflict",
    "EventNotAccepted",
    "FollowSyncFailed",
    "FollowSyncOutcome",
    "InvalidUserInput",
    "Settings",
    "SyncOutcome",
    "UserSyncFailed",
    "WaitFor",
    "change_role",
    "connect_temporal",
    "create_user",
    "creation_event",
    "delete_user",
    "deliver_change",
    "load_settings",
    "move_user",
    "submit_event",
    "user_changed",
]


_Result = TypeVar("_Result")


class WaitFor(enum.StrEnum):
    """How long a starter waits."""

    START = "start"
    ACCEPTED = "accepted"
    ROW = "row"
    PERMISSIONS = "permissions"


_STAGE: dict[WaitFor, WaitStage] = {
    WaitFor.START: "accepted",
    WaitFor.ACCEPTED: "accepted",
    WaitFor.ROW: "row",
    WaitFor.PERMISSIONS: "applied",
}
_STATUS: dict[str, Literal["started", "pending", "synced", "stale"]] = {
    "queued": "started",
    "row_committed": "pending",
    "applied": "synced",
    "stale": "stale",
}


class SyncOutcome(BaseModel):
    """What the caller learns (opaque ids only)."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    workflow_id: str
    event_id: str
    version: int
    status: Literal["started", "pending", "synced", "stale"]
    zed_token: str | None = None


# How long a starter keeps retrying a call Temporal refused for a passing reason.
DEFAULT_ACCEPT_WITHIN: Final = timedelta(seconds=60)

_TRANSIENT_CODES: Final = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.CANCELLED,
        # The client's transport reports a refused or reset connection as UNKNOWN.
        RPCStatusCode.UNKNOWN,
    }
)
# FAILED_PRECONDITION and NOT_FOUND are permanent in general, but these mean "not now": the
# workflow task is being retried (a worker died, or its task timed out behind a backlog), or the
# workflow closed as the event arrived (the next try starts a new run).
_PASSING_REFUSALS: Final = (
    "workflow task in failed state",
    "could not be executed",
    "workflow execution already completed",
    "workflow is busy",
)
_FIRST_PAUSE = 0.1
_MAX_PAUSE = 2.0


class EventNotAccepted(Exception):
    """Temporal did not confirm the event's acceptance before the caller's deadline.

    Every try was refused for a passing reason (Temporal or the connection to it down or
    overloaded, the user's workflow recovering from a crashed worker), or the last one was cut
    short by the deadline. The event may still have been accepted by that last try (its
    answer was not received); deliver it again later: a duplicate is a no-op. Nothing of an
    event is written before its acceptance is durable.
    """

    def __init__(self, workflow_id: str, event_id: str, attempts: int, last_error: str) -> None:
        super().__init__(
            f"event {event_id} not accepted by {workflow_id} after {attempts} attempts:"
            f" {last_error}"
        )
        self.workflow_id = workflow_id
        self.event_id = event_id
        self.attempts = attempts
        self.last_error = last_error


class UserSyncFailed(Exception):
    """The event failed for good and was compensated: the user is as before the event."""

    def __init__(self, workflow_id: str, event_id: str, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.workflow_id = workflow_id
        self.event_id = event_id
        self.error_type = error_type
        self.message = message


_RunInput = TypeVar("_RunInput", UserSyncInput, FollowedUserInput)


def _run_input(kind: type[_RunInput], user_id: str, idle: timedelta | None) -> _RunInput:
    """A user's workflow input, should this call start its run; the model's idle time by default.

    Raises:
        ValueError: ``idle`` is negative.
    """
    if idle is None:
        return kind(user_id=user_id)
    if idle < timedelta(0):
        raise ValueError("idle must not be negative")
    return kind(user_id=user_id, idle_seconds=idle.total_seconds())


async def submit_event(
    event: UserEvent,
    *,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
    accept_within: timedelta = DEFAULT_ACCEPT_WITHIN,
    idle: timedelta | None = None,
) -> SyncOutcome:
    """Deliver ``event`` to its user's workflow, starting the workflow if needed.

    Args:
        event: The lifecycle event.
        wait: How long to wait; see the module docstring.
        client: An injected Temporal client (built with ``pydantic_data_converter``); connected
            from the settings when omitted.
        task_queue: The workers' task queue; the settings' by default.
        accept_within: How long to keep retrying calls refused for a passing reason.
        idle: How long the user's workflow stays open with nothing to do, if this call starts
            it (10 minutes by default). ``timedelta(0)`` closes it in the workflow task that
            finished its last event: less work per user, but a failed event delivered again
            is tried afresh at once (docs/design.md#lifetimes). Every worker must run a
            release that knows it (2026-12-05 or later) before an app sends it.

    Returns:
        The outcome at the point the caller asked to wait for.

    Raises:
        InvalidUserInput: The event is malformed; nothing was started or written.
        EventIdConflict: The event id was already used for an event with different content;
            this delivery was not applied and the first event's outcome stands.
        UserSyncFailed: The event failed for good (e.g. ``DuplicateEmail``) and was compensated.
        EventNotAccepted: Temporal kept refusing the call for passing reasons until
            ``accept_within`` had passed; nothing of the event was written.
    """
    validate_event(event)
    start = _run_input(UserSyncInput, event.user_id, idle)
    client, task_queue = await client_and_queue(client, task_queue)
    workflow_id = user_workflow_id(event.user_id)
    if wait is WaitFor.START:
        await _delivered(client, task_queue, workflow_id, start, event, accept_within)
        outcome = EventOutcome(event_id=event.event_id, version=event.version, status="queued")
        return _sync_outcome(event, workflow_id, outcome)
    try:
        handle = await _accepted(client, task_queue, workflow_id, start, event, wait, accept_within)
        outcome = await _outcome(handle)
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        raise UserSyncFailed(workflow_id, event.event_id, type(cause).__name__, str(cause)) from err
    if outcome.status == "failed" and outcome.error_type == EventIdConflict.__name__:
        raise EventIdConflict(outcome.message or "", user_id=event.user_id, event_id=event.event_id)
    if outcome.status == "failed":
        raise UserSyncFailed(
            workflow_id, event.event_id, outcome.error_type or "Failed", outcome.message or ""
        )
    return _sync_outcome(event, workflow_id, outcome)


def _sync_outcome(event: UserEvent, workflow_id: str, outcome: EventOutcome) -> SyncOutcome:
    return SyncOutcome(
        user_id=event.user_id,
        workflow_id=workflow_id,
        event_id=event.event_id,
        version=event.version,
        status=_STATUS[outcome.status],
        zed_token=outcome.zed_token,
    )


def _found_by(event: UserEvent) -> TypedSearchAttributes:
    """The ids that find a user's sync, set with its start (ignored if the run exists).

    A creation's organization is the one it joins; other events' are left to the workflow,
    which shows the organization once an event is applied there.
    """
    pairs: list[SearchAttributePair[str]] = [SearchAttributePair(USER_ID_ATTRIBUTE, event.user_id)]
    if event.kind == "created" and event.org_id:
        pairs.append(SearchAttributePair(ORG_ID_ATTRIBUTE, event.org_id))
    return TypedSearchAttributes(pairs)


def _followed_by(user_id: str) -> TypedSearchAttributes:
    """The id that finds a followed user's sync, set with its start (ignored if the run exists).

    The workflow shows the ids it was started with and upserts only what differs, so a run
    started with this writes no search attribute of spicesync's while its syncs are healthy.
    """
    return TypedSearchAttributes([SearchAttributePair(USER_ID_ATTRIBUTE, user_id)])


async def _delivered(
    client: Client,
    task_queue: str,
    workflow_id: str,
    start: UserSyncInput,
    event: UserEvent,
    accept_within: timedelta,
) -> None:
    """Send the event with signal-with-start until Temporal holds it, or the deadline passed."""

    async def attempt(left: float | None) -> None:
        # A try that timed out may have landed: sending the event again is a no-op then.
        await asyncio.wait_for(
            client.start_workflow(
                USER_SYNC_WORKFLOW,
                start,
                id=workflow_id,
                task_queue=task_queue,
                start_signal=DELIVER_EVENT_SIGNAL,
                start_signal_args=[DeliverEventInput(event=event)],
                search_attributes=_found_by(event),
            ),
            timeout=left,
        )

    await _retry_passing(
        attempt,
        accept_within,
        lambda attempts, why: EventNotAccepted(workflow_id, event.event_id, attempts, why),
    )


async def _accepted(
    client: Client,
    task_queue: str,
    workflow_id: str,
    start: UserSyncInput,
    event: UserEvent,
    wait: WaitFor,
    accept_within: timedelta,
) -> WorkflowUpdateHandle[EventOutcome]:
    """Deliver the event until Temporal has durably accepted it, or the deadline has passed."""

    async def attempt(left: float | None) -> WorkflowUpdateHandle[EventOutcome]:
        return await _update_with_start(
            client,
            (USER_SYNC_WORKFLOW, start),
            (SUBMIT_EVENT_UPDATE, SubmitEventInput(event=event, wait=_STAGE[wait])),
            EventOutcome,
            workflow_id=workflow_id,
            task_queue=task_queue,
            timeout=left,
            search_attributes=_found_by(event),
        )

    return await _retry_passing(
        attempt,
        accept_within,
        lambda attempts, why: EventNotAccepted(workflow_id, event.event_id, attempts, why),
    )


async def _update_with_start(
    client: Client,
    workflow: tuple[str, BaseModel],
    update: tuple[str, BaseModel],
    result_type: type[_Result],
    *,
    workflow_id: str,
    task_queue: str,
    timeout: float | None,
    search_attributes: TypedSearchAttributes | None = None,
) -> WorkflowUpdateHandle[_Result]:
    """Send ``update`` to the user's workflow, starting it if needed; return once accepted."""
    start: WithStartWorkflowOperation[Any, None] = WithStartWorkflowOperation(
        workflow[0],
        workflow[1],
        id=workflow_id,
        task_queue=task_queue,
        search_attributes=search_attributes,
        # The user's workflow runs for as long as the user has changes: join it.
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    try:
        return await asyncio.wait_for(
            client.start_update_with_start_workflow(
                update[0],
                update[1],
                start_workflow_operation=start,
                wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                result_type=result_type,
            ),
            timeout=timeout,
        )
    finally:
        _collect_start_error(start)


async def _retry_passing(
    attempt: Callable[[float | None], Awaitable[_Result]],
    accept_within: timedelta,
    refused: Callable[[int, str], Exception],
) -> _Result:
    """Call ``attempt`` until it returns; retry refusals for a passing reason with backoff.

    Args:
        attempt: One try, given the seconds left (bounded: the client's own retries of a refused
            connection must not outlast the caller's deadline; none when the caller gave none to
            spare: one plain try).
        accept_within: How long to keep trying.
        refused: The error to raise once the deadline is near, from the attempts made and the
            last refusal's description.
    """
    deadline = time.monotonic() + accept_within.total_seconds()
    attempts = 0
    while True:
        attempts += 1
        left = deadline - time.monotonic()
        try:
            return await attempt(left if left > 0 else None)
        except (RPCError, WorkflowUpdateRPCTimeoutOrCancelledError, TimeoutError) as err:
            if not _passing(err):
                raise
            pause = min(_MAX_PAUSE, _FIRST_PAUSE * 2 ** (attempts - 1)) * random.uniform(0.5, 1)
            if time.monotonic() + pause > deadline:
                raise refused(attempts, _describe(err)) from err
            await asyncio.sleep(pause)


async def _outcome(handle: WorkflowUpdateHandle[_Result]) -> _Result:
    """Wait for an accepted event's outcome; it is durable, so a refused poll is polled again."""
    attempts = 0
    while True:
        attempts += 1
        try:
            return await handle.result()
        except (RPCError, WorkflowUpdateRPCTimeoutOrCancelledError) as err:
            if not _passing(err):
                raise
            await asyncio.sleep(min(_MAX_PAUSE, _FIRST_PAUSE * 2 ** (attempts - 1)))


def _collect_start_error(start: WithStartWorkflowOperation[Any, Any]) -> None:
    # When the call fails, the SDK also fails the operation's workflow-handle future, which
    # nobody awaits here; reading its exception keeps asyncio from reporting it at exit.
    handle = start._workflow_handle
    if handle.done() and not handle.cancelled():
        handle.exception()


def _passing(err: BaseException) -> bool:
    """Whether a refused call may succeed if tried again (never the caller's own cancel)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return False
    if isinstance(err, TimeoutError | WorkflowUpdateRPCTimeoutOrCancelledError):
        # The attempt timed out, or was cut short by the caller's deadline (a cancel of the
        # caller's own task is excluded above).
        return True
    if not isinstance(err, RPCError):
        return False
    if err.status in _TRANSIENT_CODES:
        return True
    message = err.message.lower()
    return err.status in (RPCStatusCode.FAILED_PRECONDITION, RPCStatusCode.NOT_FOUND) and any(
        passing in message for passing in _PASSING_REFUSALS
    )


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError | WorkflowUpdateRPCTimeoutOrCancelledError) and not isinstance(
        err.__cause__, RPCError
    ):
        return "no answer from Temporal before the deadline"
    if isinstance(err, RPCError):
        return f"{err.status.name}: {err.message}"
    cause = err.__cause__
    if isinstance(cause, RPCError):
        return f"{cause.status.name}: {cause.message}"
    return type(err).__name__


def _event_id(user_id: str, kind: str, version: int) -> str:
    # Derived from the business key, so the app re-sending the same change is a duplicate.
    return f"{user_id}:{kind}:v{version}"


async def create_user(
    user: CreateUserInput,
    *,
    version: int = 1,
    event_id: str | None = None,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
    accept_within: timedelta = DEFAULT_ACCEPT_WITHIN,
    idle: timedelta | None = None,
) -> SyncOutcome:
    """Deliver a ``created`` event (see :func:`submit_event`)."""
    event = creation_event(user, version=version, event_id=event_id)
    return await submit_event(
        event,
        wait=wait,
        client=client,
        task_queue=task_queue,
        accept_within=accept_within,
        idle=idle,
    )


def creation_event(
    user: CreateUserInput, *, version: int = 1, event_id: str | None = None
) -> UserEvent:
    """The ``created`` event :func:`create_user` delivers for ``user``.

    Args:
        user: The user to create.
        version: The user's version after the creation.
        event_id: The event's id; derived from the user id and version by default.

    Returns:
        The event.
    """
    return UserEvent(
        event_id=event_id or _event_id(user.user_id, "created", version),
        user_id=user.user_id,
        version=version,
        kind="created",
        org_id=user.org_id,
        role=user.role,
        email=user.email,
        name=user.name,
    )


async def _membership_change(
    kind: str,
    user_id: str,
    *,
    org_id: str,
    role: str,
    version: int,
    event_id: str | None,
    wait: WaitFor,
    client: Client | None,
    task_queue: str | None,
    accept_within: timedelta,
    idle: timedelta | None,
) -> SyncOutcome:
    event = UserEvent(
        event_id=event_id or _event_id(user_id, kind, version),
        user_id=user_id,
        version=version,
        kind=kind,
        org_id=org_id,
        role=role,
    )
    return await submit_event(
        event,
        wait=wait,
        client=client,
        task_queue=task_queue,
        accept_within=accept_within,
        idle=idle,
    )


async def change_role(
    user_id: str,
    *,
    org_id: str,
    role: str,
    version: int,
    event_id: str | None = None,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
    accept_within: timedelta = DEFAULT_ACCEPT_WITHIN,
    idle: timedelta | None = None,
) -> SyncOutcome:
    """Deliver a ``role_changed`` event: ``role`` in ``org_id`` from ``version`` on."""
    return await _membership_change(
        "role_changed",
        user_id,
        org_id=org_id,
        role=role,
        version=version,
        event_id=event_id,
        wait=wait,
        client=client,
        task_queue=task_queue,
        accept_within=accept_within,
        idle=idle,
    )


async def move_user(
    user_id: str,
    *,
    org_id: str,
    role: str,
    version: int,
    event_id: str | None = None,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
    accept_within: timedelta = DEFAULT_ACCEPT_WITHIN,
    idle: timedelta | None = None,
) -> SyncOutcome:
    """Deliver a ``moved`` event: the user belongs to ``org_id`` (as ``role``) from ``version``."""
    return await _membership_change(
        "moved",
        user_id,
        org_id=org_id,
        role=role,
        version=version,
        event_id=event_id,
        wait=wait,
        client=client,
        task_queue=task_queue,
        accept_within=accept_within,
        idle=idle,
    )


async def delete_user(
    user_id: str,
    *,
    version: int,
    event_id: str | None = None,
    wait: WaitFor = WaitFor.PERMISSIONS,
    client: Client | None = None,
    task_queue: str | None = None,
    accept_within: timedelta = DEFAULT_ACCEPT_WITHIN,
    idle: timedelta | None = None,
) -> SyncOutcome:
    """Deliver a ``deleted`` event: permissions are revoked first, then the row is deleted."""
    event = UserEvent(
        event_id=event_id or _event_id(user_id, "deleted", version),
        user_id=user_id,
        version=version,
        kind="deleted",
    )
    return await submit_event(
        event,
        wait=wait,
        client=client,
        task_queue=task_queue,
        accept_within=accept_within,
        idle=idle,
    )


# Follow mode (docs/follow-mode.md): the application owns its users table; an event only says
# "user X changed", and the user's workflow syncs SpiceDB to the row as it is now.


class ChangeNotAccepted(Exception):
    """Temporal did not confirm a change's delivery before the caller's deadline.

    Deliver it again later: a duplicate change is harmless (the sync reads the row as it is).
    """

    def __init__(self, workflow_id: str, attempts: int, last_error: str) -> None:
        super().__init__(
            f"change for {workflow_id} not accepted after {attempts} attempts: {last_error}"
        )
        self.workflow_id = workflow_id
        self.attempts = attempts
        self.last_error = last_error


class FollowSyncFailed(Exception):
    """The sync failed for good (recorded in ``spicesync_followed_users``, see ``stuck``)."""

    def __init__(self, outcome: FollowSyncOutcome) -> None:
        super().__init__(f"{outcome.error_type}: {outcome.message}")
        self.outcome = outcome


def _check_change(change: UserChangedInput) -> None:
    if not valid_user_id(change.user_id):
        raise InvalidUserInput(
            "user_id must be 1-128 characters of letters, digits and /_|-=+ (an opaque id)"
        )


async def deliver_change(
    change: UserChangedInput,
    *,
    client: Client,
    task_queue: str,
    rpc_timeout: timedelta | None = None,
    idle: timedelta | None = None,
) -> str:
    """Deliver one change with signal-with-start, durable once the server answers.

    No worker has to pick the change up before this returns, so a busy worker never slows the
    caller (a relay, say). One try; the caller decides what to do about a refusal.

    Args:
        change: The change.
        client: A client built with ``pydantic_data_converter``.
        task_queue: The workers' task queue.
        rpc_timeout: The call's own deadline; the client's default without it.
        idle: How long the user's workflow stays open with nothing to do, if this call starts
            it (10 minutes by default). ``timedelta(0)`` closes it in the workflow task that
            finished its last sync (docs/follow-mode.md#lifetimes). Every worker must run a
            release that knows it (2026-12-05 or later) first.

    Returns:
        The user's workflow id.

    Raises:
        InvalidUserInput: The user id is not an opaque, SpiceDB-safe id; nothing was sent.
        ValueError: ``idle`` is negative; nothing was sent.
        RPCError: Temporal refused the call.
    """
    _check_change(change)
    start = _run_input(FollowedUserInput, change.user_id, idle)
    workflow_id = followed_user_workflow_id(change.user_id)
    await client.start_workflow(
        FOLLOWED_USER_WORKFLOW,
        start,
        id=workflow_id,
        task_queue=task_queue,
        start_signal=USER_CHANGED_SIGNAL,
        start_signal_args=[change],
        search_attributes=_followed_by(change.user_id),
        rpc_timeout=rpc_timeout,
    )
    return workflow_id


async def user_changed(
    user_id: str,
    version: int | None = None,
    *,
    wait: Literal["accepted", "applied"] = "accepted",
    client: Client | None = None,
    task_queue: str | None = None,
    accept_within: timedelta = DEFAULT_ACCEPT_WITHIN,
    idle: timedelta | None = None,
) -> FollowSyncOutcome:
    """Tell spicesync that a followed user's row changed (inserted, updated or deleted).

    Call it after the application's transaction committed (or insert into
    ``spicesync_outbox`` inside the transaction instead, for a guarantee).

    Args:
        user_id: The user's id in the application's table.
        version: The row's version after the change, if the mapping names a version column.
        wait: ``accepted``: return once Temporal durably holds the change (signal-with-start;
            no worker needed); ``applied``: once a sync that began after it has finished,
            with its ZedToken.
        client: An injected Temporal client; connected from the settings when omitted.
        task_queue: The workers' task queue; the settings' by default.
        accept_within: How long to keep retrying calls refused for a passing reason.
        idle: How long the user's workflow stays open with nothing to do, if this call starts
            it; see :func:`deliver_change`.

    Returns:
        ``skipped`` (accepted, not waited for) or the sync's ``synced``/``unchanged``.

    Raises:
        InvalidUserInput: The user id is not an opaque, SpiceDB-safe id.
        ValueError: ``idle`` is negative; nothing was sent.
        FollowSyncFailed: ``applied`` only: the sync failed for good.
        ChangeNotAccepted: Temporal kept refusing for passing reasons until ``accept_within``.
    """
    change = UserChangedInput(user_id=user_id, version=version, source="app")
    _check_change(change)
    start = _run_input(FollowedUserInput, user_id, idle)
    client, task_queue = await client_and_queue(client, task_queue)
    workflow_id = followed_user_workflow_id(user_id)
    if wait == "accepted":

        async def deliver(left: float | None) -> str:
            return await asyncio.wait_for(
                deliver_change(change, client=client, task_queue=task_queue, idle=idle),
                timeout=left,
            )

        await _retry_passing(
            deliver,
            accept_within,
            lambda attempts, why: ChangeNotAccepted(workflow_id, attempts, why),
        )
        return FollowSyncOutcome(user_id=user_id, status="skipped", version=version)

    async def submit(left: float | None) -> WorkflowUpdateHandle[FollowSyncOutcome]:
        return await _update_with_start(
            client,
            (FOLLOWED_USER_WORKFLOW, start),
            (SYNC_CHANGE_UPDATE, change),
            FollowSyncOutcome,
            workflow_id=workflow_id,
            task_queue=task_queue,
            timeout=left,
            search_attributes=_followed_by(user_id),
        )

    handle = await _retry_passing(
        submit, accept_within, lambda attempts, why: ChangeNotAccepted(workflow_id, attempts, why)
    )
    outcome = await _outcome(handle)
    if outcome.status == "failed":
        raise FollowSyncFailed(outcome)
    return outcome
