"""The NATS JetStream relay: messages an application publishes to the followed users' workflows.

For an application that already publishes a ``user.created``-style event, or whose Debezium
pipeline publishes change events, to NATS (docs/follow-mode.md#nats-jetstream). The relay pulls
batches from a durable JetStream consumer, reads which user each message names
(:mod:`workers.nats_events`), coalesces them into one change per user, delivers each with
:func:`spicesync.client.deliver_change` (signal-with-start: durable once Temporal answers) a
bounded number at a time, and ACKs a message only after Temporal accepted its user's change.

A message that can never become a change (not JSON, no user id, an id that is not opaque) is
TERMinated at once: JetStream never delivers it again, so it neither comes back forever nor holds
the messages behind it; it is counted by reason and logged by its stream sequence only. While
Temporal refuses, the batch's messages are NAKed with the backoff's delay and nothing is ACKed.
A relay killed at any point leaves its unacked messages to JetStream, which delivers them again
after the consumer's AckWait; a duplicate change is harmless (the sync reads the row as it is).

One log line per change of state (Temporal or NATS lost, back), metrics on its own Prometheus
endpoint (with the consumer's pending count and the oldest unacked message's age), ``/readyz``
when Temporal and NATS answer, and SIGINT/SIGTERM finish the batch in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, StreamConfig
from nats.js.client import JetStreamContext
from temporalio.client import Client
from temporalio.common import MetricCounter, MetricGauge, MetricGaugeFloat, MetricMeter
from temporalio.runtime import Runtime

from spicesync.constants import NATS_ACK_WAIT_SECONDS, NATS_FETCH_SECONDS
from spicesync.health import HEALTH_CHECK_TIMEOUT_SECONDS, HealthCheck, temporal_check
from spicesync.models import UserChangedInput
from spicesync.settings import Settings
from spicesync.stack.relays import RelayRecord, listed_relay
from spicesync.temporal import connect_temporal
from workers.nats_events import (
    EventFormat,
    NatsEvent,
    PendingEvent,
    UnusableMessage,
    coalesce_events,
    parse_event,
)
from workers.relay_support import (
    Backoff,
    ChangeDelivery,
    DependencyState,
    RelayNotStarted,
    first_of,
    relay_runtime,
    serve_health,
    stop_on_signals,
)
from workers.startup_heap import freeze_startup_heap

__all__ = [
    "NatsBatch",
    "NatsMetrics",
    "NatsRelay",
    "nats_check",
    "nats_connect_options",
    "run_nats_relay",
]

log = logging.getLogger("spicesync.relay.nats")

# What NATS being down or going away looks like to nats-py (and a JetStream API error).
_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)
# How often the consumer's gauges are refreshed (one consumer info, one message lookup).
_GAUGES_EVERY_SECONDS = 5.0
_FLUSH_SECONDS = 5
# How often an idle relay asks whether its consumer still exists: a fetch from a deleted consumer
# (or from a stream re-created without it) times out exactly like a fetch with nothing to fetch.
_CONSUMER_CHECK_SECONDS = 5.0


@dataclass(frozen=True)
class NatsMetrics:
    """The relay's own metrics, served beside the SDK's on its Prometheus endpoint."""

    delivered: MetricCounter
    failures: MetricCounter
    acked: MetricCounter
    terminated: MetricCounter
    pending: MetricGauge
    ack_pending: MetricGauge
    oldest_age: MetricGaugeFloat

    @classmethod
    def on(cls, meter: MetricMeter) -> NatsMetrics:
        """Create the instruments on ``meter`` (a no-op meter when metrics are off)."""
        return cls(
            delivered=meter.create_counter(
                "spicesync_nats_changes_delivered",
                "Changes Temporal accepted from this relay (one per user per batch)",
            ),
            failures=meter.create_counter(
                "spicesync_nats_delivery_failures",
                "Deliveries Temporal refused or did not answer (messages NAKed, delivered again)",
            ),
            acked=meter.create_counter(
                "spicesync_nats_messages_acked",
                "Messages ACKed after Temporal accepted their user's change",
            ),
            terminated=meter.create_counter(
                "spicesync_nats_messages_terminated",
                "Messages terminated undelivered (they can never name a user), by reason",
            ),
            pending=meter.create_gauge(
                "spicesync_nats_consumer_pending",
                "Messages on the consumer's subjects not yet delivered to a relay",
                "messages",
            ),
            ack_pending=meter.create_gauge(
                "spicesync_nats_consumer_ack_pending",
                "Messages delivered to a relay and not acknowledged yet",
                "messages",
            ),
            oldest_age=meter.create_gauge_float(
                "spicesync_nats_oldest_unacked_age_seconds",
                "Age of the first message after the consumer's ack floor (0 when none waits)",
                "s",
            ),
        )


@dataclass
class NatsBatch:
    """What one fetch did (counts only), and the messages Temporal has not accepted yet."""

    fetched: int = 0
    delivered: int = 0
    acked: int = 0
    terminated: int = 0
    # Temporal refused or did not answer a delivery: what it said (the batch's first refusal).
    refused: str | None = None
    unaccepted: list[Msg] = field(default_factory=list)


class NatsRelay:
    """Fetches, delivers and acknowledges JetStream messages, one batch at a time."""

    def __init__(
        self,
        subscription: JetStreamContext.PullSubscription,
        delivery: ChangeDelivery,
        *,
        stream: str,
        event_format: EventFormat,
        batch_size: int,
        metrics: NatsMetrics,
        rebind: Callable[[], Awaitable[JetStreamContext.PullSubscription | None]] | None = None,
    ) -> None:
        """Set the relay up (nothing is fetched before :meth:`relay_batch`).

        Args:
            subscription: The durable pull consumer's subscription.
            delivery: Delivers changes to Temporal.
            stream: The stream's name (in each change's position).
            event_format: The mapping's id and version columns.
            batch_size: Messages fetched at once.
            metrics: Where acks and terminations are counted.
            rebind: Binds the consumer again (creating it if the settings allow) once it has
                gone; without it a vanished consumer is not looked for.
        """
        self._subscription = subscription
        self._rebind = rebind
        self._checked_at = time.monotonic()
        self._delivery = delivery
        self._stream = stream
        self._format = event_format
        self.batch_size = batch_size
        self._metrics = metrics

    async def relay_batch(self) -> NatsBatch:
        """Fetch a batch, terminate what names no user, deliver one change per user, ACK.

        Returns:
            What the batch did; its ``unaccepted`` messages are neither ACKed nor NAKed (the
            caller NAKs them with its backoff's delay).

        Raises:
            nats.errors.Error, OSError: NATS failed; nothing fetched was ACKed.
            RelayNotStarted: The consumer has gone and may not be created again.
        """
        try:
            messages = await self._subscription.fetch(self.batch_size, timeout=NATS_FETCH_SECONDS)
        except nats.errors.TimeoutError:
            await self._check_consumer()
            return NatsBatch()
        except (nats.js.errors.ServiceUnavailableError, nats.js.errors.NotFoundError):
            # What newer servers answer a fetch from a consumer that is not there.
            if await self._check_consumer():
                return NatsBatch()
            raise
        by_seq: dict[int, Msg] = {}
        events: list[tuple[int, NatsEvent]] = []
        terminated = 0
        for message in messages:
            seq = message.metadata.sequence.stream
            try:
                events.append((seq, parse_event(message.data, self._format)))
            except UnusableMessage as unusable:
                await message.term()
                terminated += 1
                self._metrics.terminated.with_additional_attributes(
                    {"reason": unusable.reason}
                ).add(1)
                log.error(
                    "message %d of stream %s terminated undelivered: %s",
                    seq,
                    self._stream,
                    unusable.reason,
                )
                continue
            by_seq[seq] = message
        pending = coalesce_events(events)
        accepted, refused = await self._delivery.deliver(pending, self._change)
        acked = [by_seq[seq] for p in accepted for seq in p.seqs]
        for message in acked:
            await message.ack()
        self._metrics.acked.add(len(acked))
        done = {seq for p in accepted for seq in p.seqs}
        return NatsBatch(
            fetched=len(messages),
            delivered=len(accepted),
            acked=len(acked),
            terminated=terminated,
            refused=refused,
            unaccepted=[m for seq, m in by_seq.items() if seq not in done],
        )

    async def _check_consumer(self) -> bool:
        """Every few seconds at most: bind the consumer again if it has gone.

        Returns:
            Whether the relay is now bound to a consumer it was not bound to before.
        """
        if self._rebind is None or time.monotonic() - self._checked_at < _CONSUMER_CHECK_SECONDS:
            return False
        self._checked_at = time.monotonic()
        try:
            await self._subscription.consumer_info()
            return False
        except nats.js.errors.NotFoundError:
            log.error(
                "the JetStream consumer of stream %s is gone (deleted, or the stream re-created):"
                " binding it again",
                self._stream,
            )
            old, subscription = self._subscription, await self._rebind()
            if subscription is None:
                return False  # stopping
            self._subscription = subscription
            with contextlib.suppress(*_NATS_ERRORS):
                await old.unsubscribe()
            log.info("bound to the JetStream consumer of stream %s again", self._stream)
            return True

    def _change(self, pending: PendingEvent) -> UserChangedInput:
        return UserChangedInput(
            user_id=pending.user_id,
            version=pending.version,
            position=f"nats:{self._stream}:{max(pending.seqs)}",
            source="nats",
        )


def nats_connect_options(settings: Settings) -> dict[str, Any]:
    """``nats.connect``'s credentials and TLS from the settings (never logged).

    Args:
        settings: The ``SPICESYNC_NATS_*`` settings.

    Returns:
        Keyword arguments for :func:`nats.connect`.
    """
    options: dict[str, Any] = {}
    if settings.nats_creds_file is not None:
        options["user_credentials"] = str(settings.nats_creds_file)
    if settings.nats_token is not None:
        options["token"] = settings.nats_token.get_secret_value()
    if settings.nats_user is not None and settings.nats_password is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_tls():
        context = ssl.create_default_context(
            cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None
        )
        if settings.nats_tls_cert is not None and settings.nats_tls_key is not None:
            context.load_cert_chain(str(settings.nats_tls_cert), str(settings.nats_tls_key))
        options["tls"] = context
    return options


async def _connect_nats(
    settings: Settings, state: DependencyState, stop: asyncio.Event
) -> NatsClient | None:
    """Connect to NATS, waiting (with backoff) for it to come up; ``None`` once stopped."""
    backoff = Backoff()

    async def lost() -> None:
        if not stop.is_set():  # closing it on the way out is no outage
            state.failed("the connection dropped")

    async def back() -> None:
        state.ok()

    async def error(err: Exception) -> None:
        # nats-py reports each failed reconnect here; the state logs the outage once.
        if not stop.is_set():
            state.failed(type(err).__name__)

    while not stop.is_set():
        try:
            connection = await nats.connect(
                [u.strip() for u in settings.nats_url.split(",") if u.strip()],
                name="spicesync-relay",
                # Never give up: the relay is a long-running process and waits NATS out.
                max_reconnect_attempts=-1,
                disconnected_cb=lost,
                reconnected_cb=back,
                error_cb=error,
                **nats_connect_options(settings),
            )
        except (*_NATS_ERRORS, ssl.SSLError) as err:
            state.failed(type(err).__name__)
            await first_of(stop, timeout=backoff.next())
            continue
        state.ok()
        return connection
    return None


async def _bind_consumer(
    js: JetStreamContext, settings: Settings
) -> JetStreamContext.PullSubscription:
    """The durable pull consumer's subscription; created (with the stream) only if allowed.

    Raises:
        RelayNotStarted: The consumer is missing and may not be created, or is not a pull
            consumer with explicit acks on the configured subjects.
    """
    assert settings.nats_stream is not None  # nats_problems() checked it
    stream, durable = settings.nats_stream, settings.nats_durable
    subjects = settings.nats_subject_list()
    try:
        info = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        if not settings.nats_create:
            raise RelayNotStarted(
                f"JetStream has no consumer {durable!r} on stream {stream!r}: create it (a"
                " durable pull consumer, explicit acks, MaxDeliver -1) or set"
                " SPICESYNC_NATS_CREATE=true"
            ) from None
        try:
            info = await _create(js, stream, durable, subjects)
        except nats.js.errors.BadRequestError as err:
            # A subject outside the stream's, say: no retry can fix the settings.
            raise RelayNotStarted(
                f"JetStream refused to create consumer {durable!r} on stream {stream!r}:"
                f" {err.description}"
            ) from None
    _check_consumer(info, subjects)
    return await js.pull_subscribe_bind(durable=durable, stream=stream)


async def _bound(
    js: JetStreamContext, settings: Settings, state: DependencyState, stop: asyncio.Event
) -> JetStreamContext.PullSubscription | None:
    """:func:`_bind_consumer`, waiting out NATS going away meanwhile; ``None`` once stopped."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            return await _bind_consumer(js, settings)
        except RelayNotStarted:
            raise
        except _NATS_ERRORS as err:
            state.failed(type(err).__name__)
            await first_of(stop, timeout=backoff.next())
    return None


async def _create(
    js: JetStreamContext, stream: str, durable: str, subjects: list[str]
) -> ConsumerInfo:
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(StreamConfig(name=stream, subjects=subjects))
        log.info("created JetStream stream %s", stream)
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=NATS_ACK_WAIT_SECONDS,
            # Delivered until Temporal accepts it, however long Temporal is down.
            max_deliver=-1,
            # One subject the way servers before 2.10 know too; several need 2.10.
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        ),
    )
    log.info("created JetStream consumer %s on stream %s", durable, stream)
    return info


def _check_consumer(info: ConsumerInfo, subjects: list[str]) -> None:
    config = info.config
    problems = []
    if config.deliver_subject:
        problems.append("it is a push consumer (the relay pulls)")
    if config.ack_policy not in (None, AckPolicy.EXPLICIT):
        problems.append("its ack policy is not explicit (a message must stay until accepted)")
    filters = sorted(config.filter_subjects or [s for s in [config.filter_subject] if s])
    if subjects and filters != sorted(subjects):
        problems.append(
            f"it filters {filters or 'every subject'}, not SPICESYNC_NATS_SUBJECTS {subjects}"
        )
    if problems:
        raise RelayNotStarted(f"JetStream consumer {info.name!r}: " + "; ".join(problems))


async def _deliver_until_stopped(relay: NatsRelay, *, stop: asyncio.Event) -> None:
    temporal = DependencyState(
        log,
        "Temporal is not accepting changes (%s): messages stay unacknowledged in JetStream;"
        " retrying with backoff",
        "Temporal accepts changes again (after %.0f s)",
    )
    fetching = DependencyState(
        log,
        "cannot fetch from JetStream (%s): retrying with backoff",
        "fetching from JetStream again (after %.0f s)",
    )
    backoff = Backoff()
    while not stop.is_set():
        try:
            batch = await relay.relay_batch()
        except _NATS_ERRORS as err:
            fetching.failed(type(err).__name__)
            await first_of(stop, timeout=backoff.next())
            continue
        fetching.ok()
        if batch.refused is not None:
            temporal.failed(batch.refused)
            pause = backoff.next()
            # JetStream holds them back for the pause, then delivers them again.
            with contextlib.suppress(*_NATS_ERRORS):
                for message in batch.unaccepted:
                    await message.nak(delay=pause)
            await first_of(stop, timeout=pause)
            continue
        if batch.delivered:
            temporal.ok()
        backoff.reset()


def nats_check(
    connection: NatsClient, timeout: float = HEALTH_CHECK_TIMEOUT_SECONDS
) -> HealthCheck:
    """NATS answers a round trip (a PING) on the relay's connection."""

    async def probe() -> None:
        if not connection.is_connected:
            raise ConnectionError("not connected to NATS")
        await connection.flush(timeout=int(max(1, timeout)))

    return HealthCheck("nats", probe)


async def _report_consumer(
    js: JetStreamContext, settings: Settings, metrics: NatsMetrics, stop: asyncio.Event
) -> None:
    """Refresh the consumer's gauges, also while Temporal is down (when they matter most)."""
    assert settings.nats_stream is not None
    subjects = settings.nats_subject_list()
    # The next message on the consumer's subjects (any, for several: an upper bound of the age).
    subject = subjects[0] if len(subjects) == 1 else ">"
    while not stop.is_set():
        with contextlib.suppress(*_NATS_ERRORS):
            info = await js.consumer_info(settings.nats_stream, settings.nats_durable)
            metrics.pending.set(info.num_pending or 0)
            metrics.ack_pending.set(info.num_ack_pending or 0)
            age = 0.0
            if (info.num_pending or 0) + (info.num_ack_pending or 0) > 0:
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                oldest = await js.get_msg(
                    settings.nats_stream, seq=floor + 1, subject=subject, next=True
                )
                if oldest.time is not None:
                    age = max(0.0, (datetime.now(UTC) - oldest.time).total_seconds())
            metrics.oldest_age.set(age)
        await first_of(stop, timeout=_GAUGES_EVERY_SECONDS)


async def run_nats_relay(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    client: Client | None = None,
) -> None:
    """Relay JetStream messages until ``stop`` is set, or SIGINT/SIGTERM when no event is given.

    Neither Temporal nor NATS has to be up at start: the relay waits for them.

    Args:
        settings: Where NATS and Temporal are, and the ``SPICESYNC_NATS_*`` settings.
        stop: Set it to finish the batch in hand and return; by default the process signals
            set it.
        client: An injected Temporal client, whose runtime's meter then takes the relay's
            metrics; otherwise one is connected (lazily) from the settings, serving
            ``SPICESYNC_NATS_METRICS_ADDRESS``.

    Raises:
        RelayNotStarted: A ``SPICESYNC_NATS_*`` setting is missing or unsafe, the consumer is
            missing (and may not be created) or unfit, or the metrics or health endpoint
            cannot listen.
        MappingError: The follow mapping is invalid.
    """
    problems = settings.nats_problems()
    if problems:
        raise RelayNotStarted("; ".join(problems))
    event_format = EventFormat.of(settings.follow_mapping())
    client_given = client is not None
    if stop is None:
        stop = stop_on_signals(log, "the batch in hand")
    if client is None:
        runtime = relay_runtime(
            settings.nats_metrics_address, setting="SPICESYNC_NATS_METRICS_ADDRESS"
        )
        client = await connect_temporal(settings, runtime=runtime, lazy=True)
    else:
        runtime = client.service_client.config.runtime or Runtime.default()
    metrics = NatsMetrics.on(runtime.metric_meter)
    link = DependencyState(
        log,
        "NATS is unavailable (%s): retrying with backoff",
        "NATS is available again (after %.0f s)",
    )
    connection = await _connect_nats(settings, link, stop)
    if connection is None:
        return
    try:
        js = connection.jetstream()
        subscription = await _bound(js, settings, link, stop)
        if subscription is None:
            return
        health = await serve_health(
            settings.nats_health_address,
            setting="SPICESYNC_NATS_HEALTH_ADDRESS",
            ready=[temporal_check(client), nats_check(connection)],
            log=log,
        )
        relay = NatsRelay(
            subscription,
            ChangeDelivery(
                client,
                task_queue=settings.task_queue,
                concurrency=settings.nats_concurrency,
                rpc_timeout=timedelta(seconds=settings.nats_rpc_timeout_seconds),
                delivered=metrics.delivered,
                failures=metrics.failures,
                idle=settings.follow_idle(),
            ),
            stream=settings.nats_stream or "",
            event_format=event_format,
            batch_size=settings.nats_batch_size,
            metrics=metrics,
            rebind=lambda: _bound(js, settings, link, stop),
        )
        helpers = []
        if runtime.metric_meter is not MetricMeter.noop:
            helpers.append(asyncio.create_task(_report_consumer(js, settings, metrics, stop)))
        freeze_startup_heap()
        log.info(
            "NATS relay: consumer %s on stream %s delivering to task queue %s (batches of %d,"
            " %d in flight)",
            settings.nats_durable,
            settings.nats_stream,
            settings.task_queue,
            settings.nats_batch_size,
            settings.nats_concurrency,
        )
        listed = RelayRecord(
            "nats",
            os.getpid(),
            health_address=settings.nats_health_address or None,
            metrics_address=None if client_given else settings.nats_metrics_address or None,
        )
        try:
            # Listed in `spicesync stack status` while it runs beside a local stack.
            with listed_relay(settings.state_dir.resolve(), listed):
                await _deliver_until_stopped(relay, stop=stop)
        finally:
            stop.set()
            if health is not None:
                health.set_draining()
            await asyncio.gather(*helpers, return_exceptions=True)
            if health is not None:
                await health.close()
    finally:
        # Sends the acks still buffered (a round trip after them) before the connection closes.
        with contextlib.suppress(*_NATS_ERRORS):
            await connection.flush(timeout=_FLUSH_SECONDS)
        await connection.close()
    log.info("NATS relay stopped")
