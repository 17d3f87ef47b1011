"""Change data capture: follow the mapped table through PostgreSQL logical replication.

``spicesync relay cdc`` is for an application that changes nothing: it writes its own table with
plain SQL, and every committed INSERT, UPDATE and DELETE of the table becomes a ``user_changed``
for the row's user (docs/follow-mode.md#change-data-capture). In a loop the relay

1. reads a batch of whole transactions from its logical replication slot, without consuming
   them (``pg_logical_slot_peek_binary_changes``, the built-in ``pgoutput`` plugin filtered by
   its publication, decoded by :mod:`workers.pgoutput`);
2. coalesces them into one change per user and delivers each with
   :func:`spicesync.client.deliver_change` (signal-with-start: durable once Temporal answers), a
   bounded number at a time;
3. confirms the slot (``pg_replication_slot_advance``) only up to the last transaction whose
   every change Temporal accepted.

A relay killed anywhere therefore resumes from the slot's confirmed position and delivers again
what it had not confirmed; a duplicate change is harmless (the sync is level-triggered). A
truncate of the table, and a slot that was lost (dropped, or invalidated for the WAL it kept),
start a follow-mode reconcile through Temporal, logged and counted. Lag (bytes of WAL and
seconds behind) is served as metrics, with a warning past ``SPICESYNC_CDC_LAG_WARN_BYTES``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
from temporalio.client import Client
from temporalio.common import MetricCounter, MetricGauge, MetricGaugeFloat, MetricMeter
from temporalio.runtime import Runtime

from spicesync.constants import CDC_HEARTBEAT_BYTES, CDC_RECONCILE_WORKFLOW_PREFIX
from spicesync.db import create_pool
from spicesync.health import postgres_check, temporal_check
from spicesync.mapping import FollowMapping, valid_user_id
from spicesync.models import ReconcileInput
from spicesync.settings import Settings
from spicesync.stack.relays import RelayRecord, listed_relay
from spicesync.temporal import connect_temporal
from starters.reconcile import ReconcileAlreadyRunning, start_reconcile
from workers.cdc_changes import Transaction, UserChange, coalesce, confirmable, read_transactions
from workers.cdc_slot import (
    CdcNotReady,
    advance_slot,
    check_source,
    ensure_publication,
    ensure_slot,
    heartbeat,
    lag_bytes,
    peek_changes,
    reconcile_done,
)
from workers.pgoutput import Decoder, format_lsn
from workers.relay_support import (
    DELIVERY_ERRORS,
    POSTGRES_ERRORS,
    Backoff,
    ChangeDelivery,
    DependencyState,
    RelayNotStarted,
    describe_postgres,
    describe_refusal,
    first_of,
    relay_runtime,
    serve_health,
    stop_on_signals,
)
from workers.startup_heap import freeze_startup_heap

__all__ = ["CdcBatch", "CdcMetrics", "CdcRelay", "run_cdc_relay"]

log = logging.getLogger("spicesync.relay")

# How often the lag in bytes is read (one look at pg_replication_slots).
_LAG_EVERY_SECONDS: Final = 5.0


class _SlotBusy(Exception):
    """Another process reads the slot now (a second relay, say); this one waits its turn."""


@dataclass(frozen=True)
class CdcMetrics:
    """The CDC relay's own metrics, served beside the SDK's on its Prometheus endpoint."""

    lag_bytes: MetricGauge
    lag_seconds: MetricGaugeFloat
    row_changes: MetricCounter
    delivered: MetricCounter
    rejected: MetricCounter
    failures: MetricCounter
    reconciles: MetricCounter

    @classmethod
    def on(cls, meter: MetricMeter) -> CdcMetrics:
        """Create the instruments on ``meter`` (a no-op meter when metrics are off)."""
        return cls(
            lag_bytes=meter.create_gauge(
                "spicesync_cdc_lag_bytes",
                "WAL written since the slot's confirmed position (kept on disk for the slot)",
                "By",
            ),
            lag_seconds=meter.create_gauge_float(
                "spicesync_cdc_lag_seconds",
                "Age of the oldest commit read but not yet confirmed (0 when caught up)",
                "s",
            ),
            row_changes=meter.create_counter(
                "spicesync_cdc_row_changes", "Row changes of the mapped table read from the slot"
            ),
            delivered=meter.create_counter(
                "spicesync_cdc_changes_delivered",
                "Changes Temporal accepted from this relay (one per user per batch)",
            ),
            rejected=meter.create_counter(
                "spicesync_cdc_changes_rejected",
                "Changes skipped: their user id is not an opaque id",
            ),
            failures=meter.create_counter(
                "spicesync_cdc_delivery_failures",
                "Deliveries Temporal refused or did not answer (not confirmed, retried)",
            ),
            reconciles=meter.create_counter(
                "spicesync_cdc_reconciles_started",
                "Reconciles started for a lost slot or a truncated table, by reason",
            ),
        )


@dataclass(frozen=True)
class CdcBatch:
    """What one read of the slot did (counts and positions only)."""

    messages: int = 0
    transactions: int = 0
    delivered: int = 0
    # A full read: more may be waiting, read again at once.
    full: bool = False
    confirmed: int | None = None
    # Temporal refused or did not answer: what it said (the batch's first refusal).
    refused: str | None = None


class CdcRelay:
    """Reads the slot, delivers one change per user, confirms what Temporal accepted."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: Client,
        mapping: FollowMapping,
        settings: Settings,
        metrics: CdcMetrics,
    ) -> None:
        """Set the relay up (nothing is read before :meth:`prepare`).

        Args:
            pool: The App DB's pool (the database of the mapped table).
            client: A Temporal client built with spicesync's data converter.
            mapping: The follow-mode mapping (its table, id and version columns).
            settings: The task queue, the ``SPICESYNC_CDC_*`` tuning, the reconcile's prune cap.
            metrics: Where deliveries, failures, reconciles and the lag are recorded.
        """
        self._pool = pool
        self._client = client
        self._mapping = mapping
        self._settings = settings
        self._metrics = metrics
        self.slot = settings.cdc_slot
        self._decoder = Decoder(
            keep=frozenset(c for c in (mapping.source.id, mapping.source.version) if c)
        )
        self._delivery = ChangeDelivery(
            client,
            task_queue=settings.task_queue,
            concurrency=settings.cdc_concurrency,
            rpc_timeout=timedelta(seconds=settings.cdc_rpc_timeout_seconds),
            delivered=metrics.delivered,
            failures=metrics.failures,
            idle=settings.follow_idle(),
        )
        self._oid: int | None = None
        # A lost slot's reconcile, until Temporal accepted it (the bookkeeping keeps it too).
        self._due: str | None = None
        self.idle = False

    @property
    def prepared(self) -> bool:
        """Whether the slot was checked (and created if need be) since it was last found gone."""
        return self._oid is not None

    async def prepare(self) -> None:
        """Check the server and the table; create the publication and the slot if missing.

        Raises:
            CdcNotReady: ``wal_level`` is not logical, the table's REPLICA IDENTITY lacks the
                id, the publication or slot name is taken, or the migrations were not applied.
        """
        settings = self._settings
        async with self._pool.acquire() as conn:
            oid = await check_source(conn, self._mapping)
            if await ensure_publication(conn, settings.cdc_publication, self._mapping, oid):
                log.info("created publication %s", settings.cdc_publication)
            state = await ensure_slot(conn, self.slot, settings.cdc_publication)
        self._decoder.relations.clear()
        if state.lost:
            log.error(
                "replication slot %s was lost (dropped, or invalidated for the WAL it kept):"
                " changes made meanwhile were never read; created it again and starting a"
                " reconcile",
                self.slot,
            )
        elif state.created:
            log.info(
                "created replication slot %s: changes from now on are followed (run `spicesync"
                " backfill` once for rows from before)",
                self.slot,
            )
        if state.reconcile_due:
            self._due = f"{CDC_RECONCILE_WORKFLOW_PREFIX}-{self.slot}-lost-{state.losses}"
        self._oid = oid

    async def relay_batch(self) -> CdcBatch:
        """Read a batch of transactions, deliver one change per user, confirm what was accepted.

        Returns:
            What the batch did.

        Raises:
            asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError: PostgreSQL
                failed; nothing was confirmed.
        """
        if self._due is not None:
            refused = await self._reconcile(self._due, "slot_lost")
            if refused is not None:
                return CdcBatch(refused=refused)
            await reconcile_done(self._pool, self.slot)
            self._due = None
        assert self._oid is not None
        limit = self._settings.cdc_batch_size
        async with self._pool.acquire() as conn:
            try:
                messages = await peek_changes(
                    conn, self.slot, self._settings.cdc_publication, limit=limit
                )
            except (asyncpg.UndefinedObjectError, asyncpg.ObjectNotInPrerequisiteStateError):
                # The slot (or the publication) is gone or invalidated: prepare() tells which and
                # creates it again; the poll interval paces a retry that finds the same.
                self._oid = None
                return CdcBatch()
            except asyncpg.ObjectInUseError:
                raise _SlotBusy from None
            transactions = read_transactions(
                self._decoder,
                messages,
                table_oid=self._oid,
                id_column=self._mapping.source.id,
                version_column=self._mapping.source.version,
            )
            outcome = await self._deliver(transactions)
            if outcome.confirmed is not None:
                await advance_slot(conn, self.slot, outcome.confirmed)
        self.idle = not messages
        self._report_lag(transactions, outcome.confirmed)
        return CdcBatch(
            messages=len(messages),
            transactions=len(transactions),
            delivered=outcome.delivered,
            full=len(messages) >= limit,
            confirmed=outcome.confirmed,
            refused=outcome.refused,
        )

    async def _deliver(self, transactions: Sequence[Transaction]) -> CdcBatch:
        changes = coalesce(transactions)
        self._metrics.row_changes.add(sum(len(t.users) for t in transactions))
        rejected = [c for c in changes if not valid_user_id(c.user_id)]
        if rejected:
            # No workflow can be named after these ids: skipping them keeps the slot moving.
            log.error(
                "%d changed users (commits %s) have a user id that is not an opaque id (1-128"
                " letters, digits and /_|-=+); skipped",
                len(rejected),
                ",".join(format_lsn(c.commit_lsn) for c in rejected),
            )
            self._metrics.rejected.add(len(rejected))
        accepted, refused = await self._delivery.deliver(
            [c for c in changes if valid_user_id(c.user_id)], UserChange.change
        )
        reconciled: set[int] = set()
        for transaction in transactions:
            if refused is not None or not transaction.truncated:
                continue
            workflow_id = (
                f"{CDC_RECONCILE_WORKFLOW_PREFIX}-{self.slot}-truncate-{transaction.commit_lsn:x}"
            )
            log.warning(
                "the mapped table was truncated (commit %s): starting a reconcile",
                format_lsn(transaction.commit_lsn),
            )
            refused = await self._reconcile(workflow_id, "truncate")
            if refused is None:
                reconciled.add(transaction.commit_lsn)
        done = {c.user_id for c in (*accepted, *rejected)}
        return CdcBatch(
            delivered=len(accepted),
            confirmed=confirmable(transactions, done, reconciled),
            refused=refused,
        )

    async def _reconcile(self, workflow_id: str, reason: str) -> str | None:
        """Start a follow-mode reconcile that repairs; ``None`` once Temporal has it."""
        request = ReconcileInput(
            dry_run=False, follow=True, prune_cap=self._settings.reconcile_prune_cap
        )
        try:
            await start_reconcile(
                request,
                client=self._client,
                task_queue=self._settings.task_queue,
                workflow_id=workflow_id,
            )
        except ReconcileAlreadyRunning:
            pass  # started before the relay died: it is running
        except DELIVERY_ERRORS as err:
            return describe_refusal(err)
        log.info("reconcile %s started (%s)", workflow_id, reason)
        self._metrics.reconciles.with_additional_attributes({"reason": reason}).add(1)
        return None

    def _report_lag(self, transactions: Sequence[Transaction], confirmed: int | None) -> None:
        waiting = [t for t in transactions if confirmed is None or t.end_lsn > confirmed]
        if not waiting:
            self._metrics.lag_seconds.set(0.0)
            return
        behind = datetime.now(UTC) - waiting[0].commit_time
        self._metrics.lag_seconds.set(max(0.0, behind.total_seconds()))


async def _relay_until_stopped(
    relay: CdcRelay, *, stop: asyncio.Event, poll_seconds: float
) -> None:
    temporal = DependencyState(
        log,
        "Temporal is not accepting changes (%s): changes wait in the slot; retrying with backoff",
        "Temporal accepts changes again (after %.0f s)",
    )
    postgres = DependencyState(
        log,
        "PostgreSQL is unavailable (%s): retrying with backoff",
        "PostgreSQL is available again (after %.0f s)",
    )
    busy = DependencyState(
        log,
        "replication slot is in use by another process (%s): waiting for it",
        "reading the replication slot again (after %.0f s)",
    )
    backoff = Backoff()
    while not stop.is_set():
        try:
            if not relay.prepared:
                await relay.prepare()
            outcome = await relay.relay_batch()
        except _SlotBusy:
            busy.failed(relay.slot)
            await first_of(stop, timeout=backoff.next())
            continue
        except POSTGRES_ERRORS as err:
            postgres.failed(describe_postgres(err))
            await first_of(stop, timeout=backoff.next())
            continue
        postgres.ok()
        busy.ok()
        if outcome.refused is not None:
            temporal.failed(outcome.refused)
            await first_of(stop, timeout=backoff.next())
            continue
        if outcome.delivered:
            temporal.ok()
        backoff.reset()
        if not outcome.full:
            await first_of(stop, timeout=poll_seconds)


async def _watch_lag(
    relay: CdcRelay,
    pool: asyncpg.Pool,
    metrics: CdcMetrics,
    *,
    warn_bytes: int,
    stop: asyncio.Event,
) -> None:
    """Read the slot's lag in bytes; warn past the threshold; let an idle slot move on."""
    retained = DependencyState(
        log,
        "replication slot lag is %s bytes, past SPICESYNC_CDC_LAG_WARN_BYTES: PostgreSQL keeps"
        " that WAL on disk until the relay catches up",
        "replication slot lag is back under SPICESYNC_CDC_LAG_WARN_BYTES (after %.0f s)",
    )
    while not stop.is_set():
        try:
            lag = await lag_bytes(pool, relay.slot)
            if lag is not None and relay.idle and lag > CDC_HEARTBEAT_BYTES:
                await heartbeat(pool)
        except POSTGRES_ERRORS:
            pass  # the delivery loop says when PostgreSQL is down
        else:
            if lag is not None:
                metrics.lag_bytes.set(lag)
                if lag > warn_bytes:
                    retained.failed(str(lag))
                else:
                    retained.ok()
        await first_of(stop, timeout=_LAG_EVERY_SECONDS)


async def run_cdc_relay(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    client: Client | None = None,
) -> None:
    """Follow the mapped table until ``stop`` is set, or SIGINT/SIGTERM when no event is given.

    Temporal need not be up at start; PostgreSQL is waited for too, but a server without
    ``wal_level = logical`` or a table whose deletes would not name the user stops it at once.

    Args:
        settings: Where PostgreSQL and Temporal are, the mapping, and the ``SPICESYNC_CDC_*``
            settings.
        stop: Set it to finish the batch in hand and return; by default the process signals
            set it.
        client: An injected Temporal client, whose runtime's meter then takes the relay's
            metrics; otherwise one is connected (lazily) from the settings, serving
            ``SPICESYNC_CDC_METRICS_ADDRESS``.

    Raises:
        RelayNotStarted: No mapping (follow mode) is configured, an endpoint cannot listen, or
            the App DB cannot feed the relay (:class:`CdcNotReady`'s one line).
        MissingSetting: ``DATABASE_URL`` is not set.
    """
    mapping = settings.follow_mapping()
    if mapping is None:
        raise RelayNotStarted(
            "relay cdc follows the table of a follow-mode mapping: set SPICESYNC_CONFIG"
            " (docs/follow-mode.md)"
        )
    if stop is None:
        stop = stop_on_signals(log, "the batch in hand")
    dsn = settings.require_database_url()
    metrics_address = None  # an injected client's runtime serves what its owner set up
    if client is None:
        metrics_address = settings.cdc_metrics_address or None
        runtime = relay_runtime(
            settings.cdc_metrics_address, setting="SPICESYNC_CDC_METRICS_ADDRESS"
        )
        client = await connect_temporal(settings, runtime=runtime, lazy=True)
    else:
        runtime = client.service_client.config.runtime or Runtime.default()
    metrics = CdcMetrics.on(runtime.metric_meter)
    pool = await create_pool(dsn, min_size=0, max_size=3)
    try:
        relay = CdcRelay(pool, client, mapping, settings, metrics)
        try:
            await relay.prepare()
        except CdcNotReady as err:
            raise RelayNotStarted(str(err)) from None
        except POSTGRES_ERRORS:
            pass  # unreachable now: the loop waits for it
        health = await serve_health(
            settings.cdc_health_address,
            setting="SPICESYNC_CDC_HEALTH_ADDRESS",
            ready=[temporal_check(client), postgres_check(pool)],
            log=log,
        )
        helpers = [
            asyncio.create_task(
                _watch_lag(relay, pool, metrics, warn_bytes=settings.cdc_lag_warn_bytes, stop=stop)
            )
        ]
        freeze_startup_heap()
        log.info(
            "cdc relay following %s through slot %s (publication %s) to task queue %s",
            mapping.source.table,
            relay.slot,
            settings.cdc_publication,
            settings.task_queue,
        )
        listed = RelayRecord(
            "cdc",
            os.getpid(),
            health_address=settings.cdc_health_address or None,
            metrics_address=metrics_address,
        )
        try:
            with listed_relay(settings.state_dir.resolve(), listed):
                await _relay_until_stopped(relay, stop=stop, poll_seconds=settings.cdc_poll_seconds)
        except CdcNotReady as err:
            raise RelayNotStarted(str(err)) from None
        finally:
            stop.set()
            if health is not None:
                health.set_draining()
            await asyncio.gather(*helpers, return_exceptions=True)
            if health is not None:
                await health.close()
    finally:
        await pool.close()
    log.info("cdc relay stopped")
