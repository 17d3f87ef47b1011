"""The transactional outbox's relay: ``spicesync_outbox`` rows to the followed users' workflows.

An application inserts the changed user's id into ``spicesync_outbox`` in the same transaction as
its own write (docs/follow-mode.md#outbox). The relay claims a batch of rows in ``seq`` order
with ``FOR UPDATE SKIP LOCKED`` (relays side by side never claim the same row), coalesces them
into one change per user, delivers each with :func:`spicesync.client.deliver_change`
(signal-with-start: durable once Temporal answers, no worker needed, so a busy worker never slows
the relay) a bounded number at a time, and deletes a row, in the transaction that holds its
lock, only after Temporal accepted its user's change.

A relay killed at any point leaves every row it had not deleted; a later claim delivers them
again, and a duplicate change is harmless: the user's workflow syncs SpiceDB to the row as it is
now and, finding nothing to change, writes nothing.

It wakes on ``NOTIFY spicesync_outbox`` (the outbox's insert trigger, LISTENed on a connection of
its own that is reopened when it drops), polls as the fallback, backs off while Temporal or
PostgreSQL is down (one log line when either changes state, not one per retry), serves its
backlog and lag as Prometheus metrics, and on SIGINT/SIGTERM finishes the batch in hand and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

import asyncpg
from temporalio.client import Client
from temporalio.common import MetricCounter, MetricGauge, MetricGaugeFloat, MetricMeter
from temporalio.runtime import Runtime

from spicesync.constants import OUTBOX_CHANNEL
from spicesync.db import create_pool
from spicesync.health import postgres_check, temporal_check
from spicesync.mapping import valid_user_id
from spicesync.models import UserChangedInput
from spicesync.settings import Settings
from spicesync.stack.relays import RelayRecord, listed_relay
from spicesync.temporal import connect_temporal
from workers.relay_support import (
    POSTGRES_ERRORS,
    Backoff,
    ChangeDelivery,
    DependencyState,
    RelayNotStarted,
    describe_postgres,
    first_of,
    relay_runtime,
    serve_health,
    stop_on_signals,
)
from workers.startup_heap import freeze_startup_heap

__all__ = [
    "LISTEN_APPLICATION_NAME",
    "BatchOutcome",
    "OutboxRelay",
    "PendingChange",
    "RelayMetrics",
    "RelayNotStarted",
    "coalesce",
    "run_outbox_relay",
]

log = logging.getLogger("spicesync.relay")

# The LISTEN connection's name in pg_stat_activity.
LISTEN_APPLICATION_NAME: Final = "spicesync-relay-listen"

# Oldest first; rows another relay holds are skipped, not waited for.
_CLAIM: Final = """
SELECT seq, user_id, version FROM spicesync_outbox
ORDER BY seq
LIMIT $1
FOR UPDATE SKIP LOCKED
"""
_DELETE: Final = "DELETE FROM spicesync_outbox WHERE seq = ANY($1::bigint[])"
_BACKLOG: Final = """
SELECT count(*) AS rows,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age
FROM spicesync_outbox
"""
_TABLE_EXISTS: Final = "SELECT to_regclass('spicesync_outbox') IS NOT NULL"

# How often the backlog gauges are refreshed (one count over the outbox).
_BACKLOG_EVERY_SECONDS: Final = 5.0
# A LISTEN connection that stops answering is replaced (a silently dropped link sends no FIN).
_PROBE_TIMEOUT_SECONDS: Final = 5.0


@dataclass(frozen=True)
class PendingChange:
    """One user's change in a claimed batch, and the outbox rows it stands for."""

    user_id: str
    # The highest version of the rows; ``None`` when a row carried none (the change is then
    # synced whatever the workflow has applied).
    version: int | None
    seqs: tuple[int, ...]

    def change(self) -> UserChangedInput:
        """The ``user_changed`` signal's payload (the last row's seq as the feed position)."""
        return UserChangedInput(
            user_id=self.user_id,
            version=self.version,
            position=f"outbox:{max(self.seqs)}",
            source="outbox",
        )


def coalesce(rows: Iterable[tuple[int, str, int | None]]) -> list[PendingChange]:
    """One change per user, in the order of each user's first row.

    A sync reads the row as it is, so one delivery stands for every row of the user in the batch.

    Args:
        rows: ``(seq, user_id, version)`` in ``seq`` order.

    Returns:
        The changes; each keeps the seqs of the rows it stands for.
    """
    seqs: dict[str, list[int]] = {}
    versions: dict[str, list[int | None]] = {}
    for seq, user_id, version in rows:
        seqs.setdefault(user_id, []).append(seq)
        versions.setdefault(user_id, []).append(version)
    changes = []
    for user_id, user_seqs in seqs.items():
        known = [v for v in versions[user_id] if v is not None]
        version = max(known) if len(known) == len(user_seqs) else None
        changes.append(PendingChange(user_id, version, tuple(user_seqs)))
    return changes


@dataclass(frozen=True)
class BatchOutcome:
    """What one claim did (counts only)."""

    claimed: int = 0
    delivered: int = 0
    deleted: int = 0
    rejected: int = 0
    # Temporal refused or did not answer a delivery: what it said (the batch's first refusal).
    refused: str | None = None


@dataclass(frozen=True)
class RelayMetrics:
    """The relay's own metrics, served beside the SDK's on its Prometheus endpoint."""

    backlog: MetricGauge
    oldest_age: MetricGaugeFloat
    delivered: MetricCounter
    deleted: MetricCounter
    rejected: MetricCounter
    failures: MetricCounter

    @classmethod
    def on(cls, meter: MetricMeter) -> RelayMetrics:
        """Create the instruments on ``meter`` (a no-op meter when metrics are off)."""
        return cls(
            backlog=meter.create_gauge(
                "spicesync_outbox_backlog", "Rows waiting in spicesync_outbox", "rows"
            ),
            oldest_age=meter.create_gauge_float(
                "spicesync_outbox_oldest_age_seconds",
                "Age of the oldest row still in spicesync_outbox (0 when empty)",
                "s",
            ),
            delivered=meter.create_counter(
                "spicesync_outbox_changes_delivered",
                "Changes Temporal accepted from this relay (one per user per batch)",
            ),
            deleted=meter.create_counter(
                "spicesync_outbox_rows_deleted",
                "Outbox rows deleted after Temporal accepted their user's change",
            ),
            rejected=meter.create_counter(
                "spicesync_outbox_rows_rejected",
                "Outbox rows deleted undelivered: their user id is not an opaque id",
            ),
            failures=meter.create_counter(
                "spicesync_outbox_delivery_failures",
                "Deliveries Temporal refused or did not answer (rows kept, retried)",
            ),
        )


class OutboxRelay:
    """Claims, delivers and deletes outbox rows, one batch at a time."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: Client,
        *,
        task_queue: str,
        batch_size: int,
        concurrency: int,
        rpc_timeout: timedelta,
        metrics: RelayMetrics,
        idle: timedelta | None = None,
    ) -> None:
        """Set the relay up (nothing is read before :meth:`relay_batch`).

        Args:
            pool: The App DB's pool (the database holding ``spicesync_outbox``).
            client: A Temporal client built with spicesync's data converter.
            task_queue: The workers' task queue (a new user's workflow is started there).
            batch_size: Rows claimed at once.
            concurrency: Deliveries in flight at once.
            rpc_timeout: Each delivery's deadline.
            metrics: Where deliveries and failures are counted.
            idle: How long a user's workflow a delivery starts stays open with nothing to do;
                the workflow's default without it.
        """
        self._pool = pool
        self.batch_size = batch_size
        self._metrics = metrics
        self._delivery = ChangeDelivery(
            client,
            task_queue=task_queue,
            concurrency=concurrency,
            rpc_timeout=rpc_timeout,
            delivered=metrics.delivered,
            failures=metrics.failures,
            idle=idle,
        )

    async def relay_batch(self) -> BatchOutcome:
        """Claim a batch, deliver one change per user, delete the rows Temporal accepted.

        Rows whose delivery Temporal refused stay (unlocked at commit) for a later batch. Once
        one delivery is refused, those of the batch not yet begun are not tried: Temporal is
        likely down, and the caller backs off.

        Returns:
            What the batch did.

        Raises:
            asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError: PostgreSQL
                failed; nothing was deleted and the rows stay.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self.batch_size)
            if not rows:
                return BatchOutcome()
            changes = coalesce((r["seq"], r["user_id"], r["version"]) for r in rows)
            rejected = [c for c in changes if not valid_user_id(c.user_id)]
            accepted, refused = await self._delivery.deliver(
                [c for c in changes if valid_user_id(c.user_id)], PendingChange.change
            )
            done = [seq for c in (*accepted, *rejected) for seq in c.seqs]
            if rejected:
                # Nobody can ever deliver these (no workflow id can be built from the id), and
                # left at the head of the outbox they would hold every batch back.
                log.error(
                    "outbox rows %s name a user id that is not an opaque id (1-128 letters,"
                    " digits and /_|-=+); deleted undelivered",
                    ",".join(str(seq) for c in rejected for seq in c.seqs),
                )
            if done:
                await self.delete_relayed(conn, done)
        deleted = sum(len(c.seqs) for c in accepted)
        rejected_rows = sum(len(c.seqs) for c in rejected)
        self._metrics.deleted.add(deleted)
        self._metrics.rejected.add(rejected_rows)
        return BatchOutcome(
            claimed=len(rows),
            delivered=len(accepted),
            deleted=deleted,
            rejected=rejected_rows,
            refused=refused,
        )

    async def delete_relayed(
        self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], seqs: Sequence[int]
    ) -> None:
        """Delete rows whose change Temporal accepted, in the transaction holding their locks.

        Args:
            conn: The claim's connection, inside its transaction.
            seqs: The rows.
        """
        await conn.execute(_DELETE, list(seqs))


async def _deliver_until_stopped(
    relay: OutboxRelay, *, stop: asyncio.Event, wake: asyncio.Event, poll_seconds: float
) -> None:
    temporal = DependencyState(
        log,
        "Temporal is not accepting changes (%s): rows wait in the outbox; retrying with backoff",
        "Temporal accepts changes again (after %.0f s)",
    )
    postgres = DependencyState(
        log,
        "PostgreSQL is unavailable (%s): retrying with backoff",
        "PostgreSQL is available again (after %.0f s)",
    )
    backoff = Backoff()
    while not stop.is_set():
        wake.clear()  # a notification from now on means rows this claim may not see
        try:
            outcome = await relay.relay_batch()
        except POSTGRES_ERRORS as err:
            postgres.failed(describe_postgres(err))
            await first_of(stop, timeout=backoff.next())
            continue
        postgres.ok()
        if outcome.refused is not None:
            temporal.failed(outcome.refused)
            await first_of(stop, timeout=backoff.next())
            continue
        if outcome.delivered:
            temporal.ok()
        backoff.reset()
        if outcome.claimed < relay.batch_size:
            await first_of(stop, wake, timeout=poll_seconds)


async def _listen(
    dsn: str, *, stop: asyncio.Event, wake: asyncio.Event, probe_every: float
) -> None:
    """LISTEN on the outbox's channel on a connection of its own; reopen it when it drops."""
    state = DependencyState(
        log,
        "the LISTEN connection is down (%s): polling only until it is back",
        "listening for outbox rows again (after %.0f s)",
    )
    backoff = Backoff()
    while not stop.is_set():
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(
                dsn,
                timeout=_PROBE_TIMEOUT_SECONDS,
                server_settings={"application_name": LISTEN_APPLICATION_NAME},
            )
            await conn.add_listener(OUTBOX_CHANNEL, lambda *_args: wake.set())
            state.ok()
            backoff.reset()
            wake.set()  # rows may have come while nobody listened
            await _hold(conn, stop=stop, probe_every=probe_every)
        except POSTGRES_ERRORS as err:
            state.failed(describe_postgres(err))
            await first_of(stop, timeout=backoff.next())
        finally:
            if conn is not None:
                with contextlib.suppress(*POSTGRES_ERRORS):
                    await asyncio.wait_for(conn.close(), _PROBE_TIMEOUT_SECONDS)
                if not conn.is_closed():
                    conn.terminate()


async def _hold(conn: asyncpg.Connection, *, stop: asyncio.Event, probe_every: float) -> None:
    """Keep a LISTEN connection until ``stop``; raise once it is closed or stops answering."""
    lost = asyncio.Event()
    conn.add_termination_listener(lambda _conn: lost.set())
    while not stop.is_set():
        await first_of(stop, lost, timeout=probe_every)
        if lost.is_set():
            raise ConnectionResetError("the LISTEN connection was closed")
        if not stop.is_set():
            await conn.execute("SELECT 1", timeout=_PROBE_TIMEOUT_SECONDS)


async def _report_backlog(pool: asyncpg.Pool, metrics: RelayMetrics, stop: asyncio.Event) -> None:
    """Refresh the backlog gauges, also while Temporal is down (when the lag matters most)."""
    while not stop.is_set():
        try:
            row = await pool.fetchrow(_BACKLOG)
        except POSTGRES_ERRORS:
            pass  # the delivery loop says when PostgreSQL is down
        else:
            assert row is not None
            metrics.backlog.set(int(row["rows"]))
            metrics.oldest_age.set(float(row["oldest_age"]))
        await first_of(stop, timeout=_BACKLOG_EVERY_SECONDS)


async def run_outbox_relay(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    client: Client | None = None,
) -> None:
    """Relay outbox rows until ``stop`` is set, or SIGINT/SIGTERM when no event is given.

    Neither Temporal nor PostgreSQL has to be up at start: the relay waits for them.

    Args:
        settings: Where PostgreSQL and Temporal are, and the ``SPICESYNC_OUTBOX_*`` tuning.
        stop: Set it to finish the batch in hand and return; by default the process signals
            set it.
        client: An injected Temporal client, whose runtime's meter then takes the relay's
            metrics; otherwise one is connected (lazily) from the settings on
            ``relay_runtime``, serving ``SPICESYNC_OUTBOX_METRICS_ADDRESS``.

    Raises:
        RelayNotStarted: The metrics or health endpoint cannot listen, or
            ``spicesync_outbox`` does not exist (the migrations were not applied).
        MissingSetting: ``DATABASE_URL`` is not set.
    """
    if stop is None:
        stop = stop_on_signals(log, "the batch in hand")
    dsn = settings.require_database_url()
    metrics_address = None  # an injected client's runtime serves what its owner set up
    if client is None:
        metrics_address = settings.outbox_metrics_address or None
        runtime = relay_runtime(
            settings.outbox_metrics_address, setting="SPICESYNC_OUTBOX_METRICS_ADDRESS"
        )
        client = await connect_temporal(settings, runtime=runtime, lazy=True)
    else:
        runtime = client.service_client.config.runtime or Runtime.default()
    metrics = RelayMetrics.on(runtime.metric_meter)
    # No connection at start (min_size=0), so a relay can start while PostgreSQL is down.
    pool = await create_pool(dsn, min_size=0, max_size=3)
    try:
        try:
            present = await pool.fetchval(_TABLE_EXISTS)
        except POSTGRES_ERRORS:
            present = True  # unreachable now: the delivery loop waits for it
        if not present:
            raise RelayNotStarted(
                "spicesync_outbox does not exist in DATABASE_URL's database: apply spicesync's"
                " migrations first (`spicesync migrate`)"
            )
        health = await serve_health(
            settings.outbox_health_address,
            setting="SPICESYNC_OUTBOX_HEALTH_ADDRESS",
            ready=[temporal_check(client), postgres_check(pool)],
            log=log,
        )
        relay = OutboxRelay(
            pool,
            client,
            task_queue=settings.task_queue,
            batch_size=settings.outbox_batch_size,
            concurrency=settings.outbox_concurrency,
            rpc_timeout=timedelta(seconds=settings.outbox_rpc_timeout_seconds),
            metrics=metrics,
            idle=settings.follow_idle(),
        )
        wake = asyncio.Event()
        helpers = [
            asyncio.create_task(
                _listen(dsn, stop=stop, wake=wake, probe_every=settings.outbox_poll_seconds)
            )
        ]
        if runtime.metric_meter is not MetricMeter.noop:
            helpers.append(asyncio.create_task(_report_backlog(pool, metrics, stop)))
        freeze_startup_heap()
        log.info(
            "outbox relay delivering to task queue %s (batches of %d, %d in flight, polling"
            " every %g s)",
            settings.task_queue,
            settings.outbox_batch_size,
            settings.outbox_concurrency,
            settings.outbox_poll_seconds,
        )
        listed = RelayRecord(
            "outbox",
            os.getpid(),
            health_address=settings.outbox_health_address or None,
            metrics_address=metrics_address,
        )
        try:
            with listed_relay(settings.state_dir.resolve(), listed):
                await _deliver_until_stopped(
                    relay, stop=stop, wake=wake, poll_seconds=settings.outbox_poll_seconds
                )
        finally:
            stop.set()
            if health is not None:
                health.set_draining()
            await asyncio.gather(*helpers, return_exceptions=True)
            if health is not None:
                await health.close()
    finally:
        await pool.close()
    log.info("outbox relay stopped")
