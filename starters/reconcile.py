"""Start a reconcile now, or keep one on a Temporal Schedule.

Both run :class:`workflows.reconcile.ReconcileWorkflow` on the workers' task queue. On demand,
one runs at a time (a second start while one runs is refused with a clear error); on the
schedule, an overlapping run is skipped.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowHandle,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from spicesync.constants import RECONCILE_SCHEDULE_ID, RECONCILE_WORKFLOW_ID
from spicesync.models import ReconcileInput, ReconcileReport
from spicesync.settings import Settings
from spicesync.temporal import client_and_queue, connect_temporal
from workflows.reconcile import ReconcileWorkflow

__all__ = [
    "ReconcileAlreadyRunning",
    "ensure_reconcile_schedule",
    "schedule_as_configured",
    "start_reconcile",
]


class ReconcileAlreadyRunning(Exception):
    """An on-demand reconcile is running already; wait for it (or cancel it)."""


async def start_reconcile(
    request: ReconcileInput,
    *,
    client: Client | None = None,
    task_queue: str | None = None,
    workflow_id: str = RECONCILE_WORKFLOW_ID,
) -> WorkflowHandle[ReconcileWorkflow, ReconcileReport]:
    """Start a reconcile now; ``await handle.result()`` for its report.

    Args:
        request: Dry run or apply, prune cap, page size.
        client: An injected Temporal client; connected from the settings when omitted.
        task_queue: The workers' task queue; the settings' by default.
        workflow_id: The run's id (one at a time per id).

    Returns:
        The running workflow's handle (its ``progress`` query shows the scan).

    Raises:
        ReconcileAlreadyRunning: A reconcile with this id is running.
    """
    client, task_queue = await client_and_queue(client, task_queue)
    try:
        return await client.start_workflow(
            ReconcileWorkflow.run,
            request,
            id=workflow_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        )
    except WorkflowAlreadyStartedError:
        raise ReconcileAlreadyRunning(
            f"a reconcile is already running (workflow id {workflow_id}); wait for it to finish"
        ) from None


async def ensure_reconcile_schedule(
    every: timedelta,
    request: ReconcileInput,
    *,
    client: Client | None = None,
    task_queue: str | None = None,
    schedule_id: str = RECONCILE_SCHEDULE_ID,
    paused: bool = False,
) -> str:
    """Create the reconcile schedule, or bring an existing one up to date (idempotent).

    Args:
        every: How often a reconcile starts.
        request: What each run does (dry run or apply, prune cap, page size).
        client: An injected Temporal client; connected from the settings when omitted.
        task_queue: The workers' task queue; the settings' by default.
        schedule_id: The schedule's id.
        paused: Create or leave the schedule paused.

    Returns:
        The schedule id.
    """
    client, task_queue = await client_and_queue(client, task_queue)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            ReconcileWorkflow.run,
            request,
            id=f"{schedule_id}-scheduled",
            task_queue=task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        # Never two reconciles at once: a run still going when the next is due is enough.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    schedule.state.paused = paused
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:

        def replace(_current: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(replace)
    return schedule_id


async def schedule_as_configured(settings: Settings) -> str:
    """Keep the reconcile schedule as the settings say (created or updated; idempotent).

    Args:
        settings: The interval, dry run or apply, prune cap, the mode (a mapping configured:
            follow mode), and where Temporal is.

    Returns:
        The schedule id.
    """
    return await ensure_reconcile_schedule(
        timedelta(seconds=settings.reconcile_interval_seconds),
        ReconcileInput(
            dry_run=not settings.reconcile_apply,
            prune_cap=settings.reconcile_prune_cap,
            # Follow mode when a mapping is configured (the workers then scan through it).
            follow=settings.mapping_path() is not None,
        ),
        client=await connect_temporal(settings),
        task_queue=settings.task_queue,
    )
