"""Build and run a spicesync worker.

The PostgreSQL pool and the SpiceDB client are created once, at start, and shared by every
activity. ``/livez`` and ``/readyz`` (:mod:`spicesync.health`) answer beside the metrics. On
SIGINT/SIGTERM the worker stops polling, reports itself not ready, lets in-flight activities
finish for ``SPICESYNC_SHUTDOWN_GRACE_SECONDS`` (then cancels what is left; Temporal retries it
on another worker), closes both and returns, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import grpc.aio
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import UnsandboxedWorkflowRunner, Worker, WorkflowRunner

from activities.backfill import BackfillActivities
from activities.follow_backfill import FollowBackfillActivities
from activities.follow_reconcile import FollowReconcileActivities
from activities.followed_users import FollowedUserActivities
from activities.memberships import MembershipActivities
from activities.reconcile import ReconcileActivities
from activities.user_rows import UserRowActivities
from spicesync.app_table import AppTable, inspect_app_table
from spicesync.db import create_pool
from spicesync.health import (
    HealthServer,
    parse_address,
    postgres_check,
    spicedb_check,
    temporal_check,
)
from spicesync.logs import sdk_core_logging
from spicesync.settings import Settings
from spicesync.spicedb import (
    REQUIRED_RELATIONS,
    SpiceDBClient,
    check_schema,
    connect_configured_spicedb,
)
from spicesync.temporal import connect_temporal
from workers.startup_heap import freeze_startup_heap
from workflows.backfill import BackfillWorkflow
from workflows.followed_user import FollowedUserWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.user_sync import UserSyncWorkflow

__all__ = [
    "SpiceDBKeyRefused",
    "WorkerNotStarted",
    "WorkerResources",
    "build_worker",
    "health_server",
    "open_resources",
    "run_worker",
    "worker_runtime",
    "worker_tuning",
]

log = logging.getLogger("spicesync.worker")

_REFUSED_KEY = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class SpiceDBKeyRefused(RuntimeError):
    """SpiceDB rejected the worker's preshared key at start-up; the worker does not start."""


class WorkerNotStarted(RuntimeError):
    """The worker's process could not be set up as configured (e.g. its metrics address)."""


def worker_runtime(metrics_address: str | None) -> Runtime:
    """The worker's Temporal runtime: the SDK core's logs in the process's log, metrics served.

    Args:
        metrics_address: ``host:port`` of the Prometheus ``/metrics`` endpoint; none if empty.

    Raises:
        WorkerNotStarted: The metrics endpoint cannot listen there (in use, say).
    """
    metrics = PrometheusConfig(bind_address=metrics_address) if metrics_address else None
    try:
        return Runtime(telemetry=TelemetryConfig(logging=sdk_core_logging(), metrics=metrics))
    except ValueError as err:  # the SDK's "Failed starting Prometheus exporter: ..."
        raise WorkerNotStarted(
            f"cannot serve metrics on {metrics_address} ({err}); set SPICESYNC_METRICS_ADDRESS"
            " to a free host:port, or to nothing for no metrics"
        ) from None


def health_server(address: str, client: Client, resources: WorkerResources) -> HealthServer:
    """The worker's ``/livez`` and ``/readyz``: ready when Temporal, PostgreSQL and SpiceDB answer.

    Args:
        address: ``host:port`` to listen on.
        client: The worker's Temporal client.
        resources: The worker's pool and SpiceDB client (the ones its activities use).

    Raises:
        WorkerNotStarted: ``address`` is not ``host:port``.
    """
    try:
        host, port = parse_address(address)
    except ValueError as err:
        raise WorkerNotStarted(f"SPICESYNC_HEALTH_ADDRESS: {err}") from None
    checks = [
        temporal_check(client),
        postgres_check(resources.pool),
        spicedb_check(resources.spicedb),
    ]
    return HealthServer(host, port, ready=checks)


@dataclass(frozen=True)
class WorkerResources:
    """The long-lived connections a worker's activities share.

    ``app_table`` is set in follow mode: the application's users table as the mapping reads it,
    checked against the catalog at start.
    """

    pool: asyncpg.Pool
    spicedb: SpiceDBClient
    app_table: AppTable | None = None


@contextlib.asynccontextmanager
async def open_resources(settings: Settings) -> AsyncIterator[WorkerResources]:
    """Open the pool and the SpiceDB client once; close both on exit.

    Args:
        settings: Where PostgreSQL and SpiceDB are.

    Yields:
        The shared resources.

    Raises:
        MappingError: Follow mode's mapping is invalid, or the application's table lacks a
            mapped column or has one of an unusable type (one line per problem, naming the key).
    """
    settings.require_spicedb()  # before the pool opens, so a missing key leaks nothing
    # Before any connection: a bad mapping file is reported without waiting on a store.
    mapping = settings.follow_mapping()
    pool = await create_pool(
        settings.require_database_url(),
        min_size=settings.database_pool_min_size,
        max_size=settings.database_pool_max_size,
    )
    try:
        app_table = None if mapping is None else await inspect_app_table(pool, mapping)
    except BaseException:
        await pool.close()
        raise
    spicedb = connect_configured_spicedb(settings)
    try:
        yield WorkerResources(pool=pool, spicedb=spicedb, app_table=app_table)
    finally:
        await spicedb.close()
        await pool.close()


def worker_tuning(settings: Settings | None) -> dict[str, int | timedelta | WorkflowRunner]:
    """The ``Worker`` options the settings change from the SDK's defaults.

    Args:
        settings: The worker's settings; the SDK's defaults without them.
    """
    if settings is None:
        return {}
    tuning: dict[str, int | timedelta | WorkflowRunner] = {
        "graceful_shutdown_timeout": timedelta(seconds=settings.shutdown_grace_seconds)
    }
    if not settings.workflow_sandbox:
        # Every workflow, not only those declared sandboxed=False: the SDK's default runner
        # for them is the sandbox (docs/performance.md, "Worker profile of 2026-12-02").
        tuning["workflow_runner"] = UnsandboxedWorkflowRunner()
    for option, value in (
        ("max_cached_workflows", settings.worker_max_cached_workflows),
        ("max_concurrent_workflow_tasks", settings.worker_max_concurrent_workflow_tasks),
        ("max_concurrent_activities", settings.worker_max_concurrent_activities),
        ("max_concurrent_local_activities", settings.worker_max_concurrent_activities),
        ("max_concurrent_workflow_task_polls", settings.worker_workflow_task_pollers),
    ):
        if value is not None:
            tuning[option] = value
    tuning["sticky_queue_schedule_to_start_timeout"] = timedelta(
        seconds=settings.worker_sticky_queue_seconds
    )
    return tuning


def build_worker(
    client: Client,
    resources: WorkerResources,
    *,
    task_queue: str,
    settings: Settings | None = None,
) -> Worker:
    """Register the workflows (user sync, reconcile, backfill; follow mode's) and activities.

    Args:
        client: A client built with ``pydantic_data_converter``.
        resources: The shared pool and SpiceDB client.
        task_queue: The queue to poll.
        settings: Worker tuning (cache size, slots, pollers, the workflow sandbox); the SDK's
            defaults without it (workflows sandboxed).

    Returns:
        The (not yet running) worker.
    """
    rows = UserRowActivities(resources.pool)
    memberships = MembershipActivities(resources.spicedb, resources.pool)
    reconcile = ReconcileActivities(resources.pool, resources.spicedb, client, task_queue)
    backfill = BackfillActivities(resources.pool, resources.spicedb, client)
    workflows: list[type] = [UserSyncWorkflow, ReconcileWorkflow, BackfillWorkflow]
    follow_activities: list[Callable[..., Any]] = []
    if resources.app_table is not None:
        follow = FollowedUserActivities(resources.pool, resources.spicedb, resources.app_table)
        workflows.append(FollowedUserWorkflow)
        follow_activities = [follow.sync_followed_user, follow.record_follow_failure]
        # Reconcile and backfill in follow mode (their workflows are registered in both modes).
        follow_reconcile = FollowReconcileActivities(
            resources.pool, resources.spicedb, client, task_queue, resources.app_table
        )
        follow_backfill = FollowBackfillActivities(
            resources.pool, client, task_queue, resources.app_table
        )
        follow_activities += [
            follow_reconcile.check_follow_schema,
            follow_reconcile.scan_followed_rows,
            follow_reconcile.scan_followed_relationships,
            follow_reconcile.deliver_repairs,
            follow_reconcile.save_follow_report,
            follow_backfill.count_followed_backfill_candidates,
            follow_backfill.deliver_backfill_batch,
        ]
    return Worker(
        client,
        task_queue=task_queue,
        **worker_tuning(settings),  # type: ignore[arg-type]
        workflows=workflows,
        activities=[
            rows.read_user_state,
            rows.insert_created_row,
            rows.apply_row,
            rows.undo_created_row,
            rows.record_repair,
            memberships.read_memberships,
            memberships.write_memberships,
            reconcile.check_schema_ready,
            reconcile.scan_app_db_page,
            reconcile.scan_spicedb_page,
            reconcile.repair_users,
            reconcile.save_report,
            backfill.count_backfill_candidates,
            backfill.backfill_batch,
            backfill.count_unchecked_syncs,
            *follow_activities,
        ],
    )


async def run_worker(
    settings: Settings, *, stop: asyncio.Event | None = None, client: Client | None = None
) -> None:
    """Run a worker until ``stop`` is set, or SIGINT/SIGTERM when no event is given.

    Once stopped it drains: no new tasks, ``/readyz`` answers ``draining``, in-flight
    activities get ``settings.shutdown_grace_seconds`` to finish before they are cancelled.

    Args:
        settings: Connection settings.
        stop: Set it to shut down; by default the process signals set it.
        client: An injected Temporal client; connected from the settings otherwise, on the
            runtime of :func:`worker_runtime`.

    Raises:
        SpiceDBKeyRefused: SpiceDB rejected the preshared key; nothing was polled.
        WorkerNotStarted: The process could not be set up as configured.
        MappingError: Follow mode's mapping is invalid or does not fit the application's table.
    """
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    # A bad mapping file fails the start before anything is connected.
    settings.follow_mapping()
    if client is None:
        client = await connect_temporal(settings, runtime=worker_runtime(settings.metrics_address))
    async with open_resources(settings) as resources, contextlib.AsyncExitStack() as stack:
        health: HealthServer | None = None
        if settings.health_address:
            health = health_server(settings.health_address, client, resources)
            try:
                await stack.enter_async_context(health)
            except OSError as err:
                raise WorkerNotStarted(
                    f"cannot serve health checks on {settings.health_address} ({err});"
                    " set SPICESYNC_HEALTH_ADDRESS to a free host:port, or to nothing for none"
                ) from None
            log.info("health checks on http://%s/livez and /readyz", settings.health_address)
        try:
            required = (
                REQUIRED_RELATIONS
                if resources.app_table is None
                else resources.app_table.mapping.required_schema()
            )
            missing = await check_schema(resources.spicedb, required)
        except grpc.aio.AioRpcError as err:
            if err.code() in _REFUSED_KEY:
                # Serving with a key SpiceDB rejects would only hold every sync: refuse to start,
                # so the deployment fails where the operator looks; events wait in Temporal.
                raise SpiceDBKeyRefused(
                    f"SpiceDB at {settings.spicedb_endpoint} refused the preshared key"
                    f" ({err.code().name}); fix SPICEDB_PRESHARED_KEY"
                ) from err
            # SpiceDB being down must not keep the worker from starting: syncs wait for it.
            log.warning("could not check SpiceDB's schema now: %s", err.code().name)
            missing = []
        if missing:
            # Syncs that need these park (visible in `spicesync stuck` and the UI) until the
            # schema is fixed and they are resumed; the worker still serves everything else.
            log.error("SpiceDB schema is missing what spicesync writes: %s", "; ".join(missing))
        worker = build_worker(client, resources, task_queue=settings.task_queue, settings=settings)
        freeze_startup_heap()
        async with worker:
            log.info("worker polling task queue %s", settings.task_queue)
            await stop.wait()
            if health is not None:
                health.set_draining()
            log.info(
                "shutting down: in-flight activities have %s s to finish",
                f"{settings.shutdown_grace_seconds:g}",
            )
    log.info("worker stopped")
