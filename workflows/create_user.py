"""The user-creation saga: App DB row, then SpiceDB relationship, then the row marked synced.

Transient failures retry durably (the activity RetryPolicy, forever, with backoff); a permanent
failure or a cancellation undoes what this run wrote, in reverse order, and the user ends in
"neither": no row, no relationship.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.types import MethodAsyncSingleParam, ParamType, ReturnType
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.memberships import MembershipActivities
    from activities.user_rows import UserRowActivities
    from spicesync.constants import ACTIVITY_START_TO_CLOSE
    from spicesync.errors import NON_RETRYABLE_ERROR_TYPES, InvalidUserInput
    from spicesync.models import (
        CreateUserInput,
        CreateUserResult,
        DeleteMembershipInput,
        DeleteUserRowInput,
        InsertUserRowInput,
        MarkUserSyncedInput,
        Membership,
        RowCommittedInput,
        RowCommittedResult,
        WriteMembershipInput,
    )
    from spicesync.validation import validate_create_user

__all__ = [
    "COMPENSATION_RETRY",
    "STAGE",
    "STEP_RETRY",
    "CreateUserWorkflow",
]

STAGE = SearchAttributeKey.for_keyword("SpicesyncStage")
USER_ID = SearchAttributeKey.for_keyword("SpicesyncUserId")
ORG_ID = SearchAttributeKey.for_keyword("SpicesyncOrgId")

# Forward steps: transient failures retry for as long as it takes (an outage shows up as a
# retrying activity, never as a lost event); typed business errors fail at once.
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)
# Compensation must finish whatever happens, so nothing is non-retryable there.
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
)
_TIMEOUT = timedelta(seconds=ACTIVITY_START_TO_CLOSE)


@workflow.defn
class CreateUserWorkflow:
    """Create one user in the App DB and SpiceDB, or in neither."""

    def __init__(self) -> None:
        self._user_id = ""
        self._row_committed = False
        self._failure: ApplicationError | None = None

    @workflow.run
    async def run(self, event: CreateUserInput) -> CreateUserResult:
        """Run the saga for one ``user.created`` event.

        Args:
            event: The user to create.

        Returns:
            The synced user and the ZedToken its permissions were written at.

        Raises:
            ApplicationError: Of the type of the permanent failure (``InvalidUserInput``,
                ``DuplicateEmail``, ``SpiceDBRejected``, ...) once compensation has finished.
        """
        self._user_id = event.user_id
        try:
            validate_create_user(event)
        except InvalidUserInput as err:
            # Nothing has been written; fail with the reasons, naming fields, not values.
            self._failure = ApplicationError(
                err.message, type="InvalidUserInput", non_retryable=True
            )
            await workflow.wait_condition(workflow.all_handlers_finished)
            raise self._failure from None

        workflow.upsert_search_attributes(
            [USER_ID.value_set(event.user_id), ORG_ID.value_set(event.org_id)]
        )
        run_id = workflow.info().run_id
        membership = Membership(user_id=event.user_id, org_id=event.org_id, role=event.role)
        insert_started = write_started = row_created = False
        try:
            self._stage("inserting_row")
            insert_started = True
            inserted = await _step(
                UserRowActivities.insert_user_row,
                InsertUserRowInput(
                    user_id=event.user_id,
                    email=event.email,
                    name=event.name,
                    org_id=event.org_id,
                    role=event.role,
                    run_id=run_id,
                ),
            )
            row_created = inserted.created
            self._row_committed = True

            self._stage("writing_permissions")
            write_started = True
            try:
                written = await _step(
                    MembershipActivities.write_membership,
                    WriteMembershipInput(membership=membership),
                )
            except ActivityError as err:
                # SpiceDB applies a WriteRelationships call whole or not at all: a refusal means
                # nothing landed, so there is nothing to undo (and with a wrong key, the undo
                # itself could never succeed).
                if _refused(err):
                    write_started = False
                raise

            self._stage("marking_synced")
            synced = await _step(
                UserRowActivities.mark_user_synced,
                MarkUserSyncedInput(
                    user_id=event.user_id, run_id=run_id, zed_token=written.zed_token
                ),
            )
            self._stage("synced")
            return CreateUserResult(
                user_id=event.user_id,
                status=synced.status,
                zed_token=written.zed_token,
                row_created=row_created,
            )
        except (ActivityError, asyncio.CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            self._failure = _as_failure(err, cancelled=cancelled)
            self._stage("compensating")
            # A write whose activity was interrupted may still have landed, so every step that
            # started is undone. The relationship is removed only for a user this run created:
            # a pre-existing user keeps its grant.
            compensation = asyncio.ensure_future(
                self._compensate(
                    run_id,
                    membership if write_started and row_created else None,
                    delete_row=insert_started,
                )
            )
            await _shielded(compensation)
            self._stage("compensated")
            await workflow.wait_condition(workflow.all_handlers_finished)
            if cancelled:
                raise  # the workflow closes as Cancelled
            raise self._failure from err

    @workflow.update
    async def row_committed(self, _request: RowCommittedInput) -> RowCommittedResult:
        """Return once the App DB row is committed: the app's "201 Created" moment.

        Raises:
            ApplicationError: If the saga failed before the row was committed.
        """
        await workflow.wait_condition(lambda: self._row_committed or self._failure is not None)
        if not self._row_committed and self._failure is not None:
            raise self._failure
        return RowCommittedResult(user_id=self._user_id, status="pending")

    async def _compensate(
        self, run_id: str, membership: Membership | None, *, delete_row: bool
    ) -> None:
        """Undo this run's writes in reverse order; every step retries until it succeeds."""
        if membership is not None:
            await workflow.execute_activity_method(
                MembershipActivities.delete_membership,
                DeleteMembershipInput(membership=membership),
                start_to_close_timeout=_TIMEOUT,
                retry_policy=COMPENSATION_RETRY,
            )
        if delete_row:
            await workflow.execute_activity_method(
                UserRowActivities.delete_user_row,
                DeleteUserRowInput(user_id=self._user_id, run_id=run_id),
                start_to_close_timeout=_TIMEOUT,
                retry_policy=COMPENSATION_RETRY,
            )

    def _stage(self, stage: str) -> None:
        workflow.upsert_search_attributes([STAGE.value_set(stage)])


def _step(
    activity: MethodAsyncSingleParam[Any, ParamType, ReturnType], arg: ParamType
) -> Awaitable[ReturnType]:
    """Run a forward step of the saga with its retry policy."""
    # WAIT_CANCELLATION_COMPLETED: on cancel, compensation must start only after an in-flight
    # write has really stopped, or the write could land after its undo.
    return workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=_TIMEOUT,
        retry_policy=STEP_RETRY,
        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    )


def _refused(err: ActivityError) -> bool:
    cause = err.cause
    return isinstance(cause, ApplicationError) and cause.type in NON_RETRYABLE_ERROR_TYPES


def _as_failure(err: BaseException, *, cancelled: bool) -> ApplicationError:
    if cancelled:
        return ApplicationError("the sync was cancelled", type="Cancelled", non_retryable=True)
    cause = err.cause if isinstance(err, ActivityError) else None
    if isinstance(cause, ApplicationError):
        return ApplicationError(cause.message, type=cause.type, non_retryable=True)
    return ApplicationError(str(cause or err), type="ActivityFailed", non_retryable=True)


async def _shielded(task: asyncio.Future[None]) -> None:
    """Wait for ``task`` even if this workflow is cancelled again meanwhile."""
    while True:
        try:
            await asyncio.shield(task)
            return
        except asyncio.CancelledError:
            if task.done():
                task.result()
                return
