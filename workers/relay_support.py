"""What every relay (outbox, change data capture, NATS) shares: delivery, backoff, operations.

A relay turns an application's changes into ``user_changed`` signals for the followed users'
workflows (:func:`spicesync.client.deliver_change`: signal-with-start, durable once Temporal
answers) and acknowledges its feed only for what Temporal accepted. The feeds differ; the way a
relay waits out an outage, reports it once, serves metrics and health and drains on SIGTERM does
not, and lives here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Final, TypeVar

import asyncpg
from temporalio.client import Client
from temporalio.common import MetricCounter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError

from spicesync.client import deliver_change
from spicesync.health import HealthCheck, HealthServer, parse_address
from spicesync.logs import sdk_core_logging
from spicesync.models import UserChangedInput

__all__ = [
    "DELIVERY_ERRORS",
    "POSTGRES_ERRORS",
    "Backoff",
    "ChangeDelivery",
    "DependencyState",
    "RelayNotStarted",
    "describe_postgres",
    "describe_refusal",
    "first_of",
    "relay_runtime",
    "serve_health",
    "stop_on_signals",
]

# What PostgreSQL being down or going away looks like to asyncpg (refused, reset, shut down,
# timed out), and the errors of a statement; a relay waits all of them out. asyncpg's
# InternalClientError is a pooled connection left mid-operation by such a failure ("cannot
# switch to state ..."; seen when the server restarted under the CDC relay): the pool drops that
# connection on release, so the next try gets a new one.
POSTGRES_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# A refused or unanswered delivery: the server's refusal, or a client that cannot connect.
DELIVERY_ERRORS: Final = (RPCError, RuntimeError, TimeoutError)

_FIRST_PAUSE: Final = 0.5
_MAX_PAUSE: Final = 30.0

_Item = TypeVar("_Item")


class RelayNotStarted(RuntimeError):
    """A relay could not be set up as configured (its metrics address, a missing table...)."""


class ChangeDelivery:
    """Delivers a batch's changes to Temporal, a bounded number at a time."""

    def __init__(
        self,
        client: Client,
        *,
        task_queue: str,
        concurrency: int,
        rpc_timeout: timedelta,
        delivered: MetricCounter,
        failures: MetricCounter,
        idle: timedelta | None = None,
    ) -> None:
        """Set the delivery up.

        Args:
            client: A Temporal client built with spicesync's data converter.
            task_queue: The workers' task queue (a new user's workflow is started there).
            concurrency: Deliveries in flight at once.
            rpc_timeout: Each delivery's deadline.
            delivered: Counts the changes Temporal accepted.
            failures: Counts refused or unanswered deliveries, by ``reason``.
            idle: How long a user's workflow this delivery starts stays open with nothing to
                do (``SPICESYNC_FOLLOW_IDLE_SECONDS``); the workflow's default without it.
        """
        self._client = client
        self._task_queue = task_queue
        self._concurrency = concurrency
        self._rpc_timeout = rpc_timeout
        self._delivered = delivered
        self._failures = failures
        self._idle = idle

    async def deliver(
        self, items: Sequence[_Item], change: Callable[[_Item], UserChangedInput]
    ) -> tuple[list[_Item], str | None]:
        """Deliver each item's change; stop beginning new ones after the first refusal.

        Once one delivery is refused, Temporal is likely down: the rest are left for the
        caller's next try (after its backoff) rather than each waiting out its own deadline.

        Args:
            items: What the feed holds, one per user.
            change: The ``user_changed`` payload an item stands for.

        Returns:
            The items Temporal accepted (the feed may acknowledge exactly these), and the first
            refusal's description, if any.
        """
        gate = asyncio.Semaphore(self._concurrency)
        refusals: list[str] = []

        async def one(item: _Item) -> bool:
            async with gate:
                if refusals:
                    return False
                try:
                    await deliver_change(
                        change(item),
                        client=self._client,
                        task_queue=self._task_queue,
                        rpc_timeout=self._rpc_timeout,
                        idle=self._idle,
                    )
                except DELIVERY_ERRORS as err:
                    refusals.append(describe_refusal(err))
                    reason = err.status.name if isinstance(err, RPCError) else type(err).__name__
                    self._failures.with_additional_attributes({"reason": reason}).add(1)
                    return False
                self._delivered.add(1)
                return True

        results = await asyncio.gather(*(one(item) for item in items))
        accepted = [item for item, ok in zip(items, results, strict=True) if ok]
        return accepted, (refusals[0] if refusals else None)


def describe_refusal(err: BaseException) -> str:
    """A delivery failure in one line, without the change it carried."""
    if isinstance(err, RPCError):
        return f"{err.status.name}: {err.message}"
    if isinstance(err, TimeoutError):
        return "no answer before the deadline"
    return str(err).split(":", 1)[0]  # the SDK's "Failed client connect: <transport detail>"


def describe_postgres(err: BaseException) -> str:
    """A PostgreSQL failure as its class and SQLSTATE only: a server message may quote a row."""
    sqlstate = getattr(err, "sqlstate", None)
    return f"{type(err).__name__}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")


class Backoff:
    """Exponential pauses with jitter, from half a second up to thirty."""

    def __init__(self) -> None:
        """Start at the first, shortest pause."""
        self._tries = 0

    def next(self) -> float:
        """The next pause, in seconds."""
        pause: float = min(_MAX_PAUSE, _FIRST_PAUSE * 2.0**self._tries) * random.uniform(0.5, 1)
        self._tries = min(self._tries + 1, 16)  # past the cap anyway; keeps 2**n finite
        return pause

    def reset(self) -> None:
        """Back to the first pause (after a success)."""
        self._tries = 0


class DependencyState:
    """Whether something a relay depends on works; logs only when that changes."""

    def __init__(self, log: logging.Logger, lost: str, back: str) -> None:
        """Set the two messages up.

        Args:
            log: Where the two lines go.
            lost: Logged (warning) when it first fails; ``%s`` takes the reason.
            back: Logged (info) when it works again; ``%.0f`` takes the seconds it was down.
        """
        self._log = log
        self._lost = lost
        self._back = back
        self._since: float | None = None

    @property
    def down(self) -> bool:
        """Whether the last outcome was a failure."""
        return self._since is not None

    def failed(self, reason: str) -> None:
        """Record a failure; the first one of an outage is logged."""
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning(self._lost, reason)

    def ok(self) -> None:
        """Record a success; the first one after an outage is logged."""
        if self._since is not None:
            self._log.info(self._back, time.monotonic() - self._since)
            self._since = None


async def first_of(*events: asyncio.Event, timeout: float | None) -> None:
    """Wait until one of ``events`` is set, or ``timeout`` has passed."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def relay_runtime(metrics_address: str | None, *, setting: str) -> Runtime:
    """A relay's Temporal runtime: metrics served, the SDK core's errors in the JSON log.

    The core's warnings are left out: they are the client's retries of a refused call, which
    the relay reports itself, once per change of state.

    Args:
        metrics_address: ``host:port`` of the Prometheus ``/metrics`` endpoint; none if empty.
        setting: The environment variable that sets it, named in the error.

    Raises:
        RelayNotStarted: The metrics endpoint cannot listen there (in use, say).
    """
    metrics = PrometheusConfig(bind_address=metrics_address) if metrics_address else None
    try:
        return Runtime(
            telemetry=TelemetryConfig(logging=sdk_core_logging("ERROR"), metrics=metrics)
        )
    except ValueError as err:  # the SDK's "Failed starting Prometheus exporter: ..."
        raise RelayNotStarted(
            f"cannot serve metrics on {metrics_address} ({err}); set {setting} to a free"
            " host:port, or to nothing for no metrics"
        ) from None


def stop_on_signals(log: logging.Logger, draining: str) -> asyncio.Event:
    """An event SIGINT and SIGTERM set (the relay then finishes what it holds and returns).

    Args:
        log: Where the shutdown is announced.
        draining: What the relay finishes before it exits, for the log line.
    """
    stop = asyncio.Event()

    def stopping() -> None:
        if not stop.is_set():
            log.info("shutting down: finishing %s", draining)
            stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping)
    return stop


async def serve_health(
    address: str | None, *, setting: str, ready: list[HealthCheck], log: logging.Logger
) -> HealthServer | None:
    """A relay's ``/livez`` and ``/readyz`` (ready: every check answers), if an address is set.

    Args:
        address: ``host:port``; none if empty.
        setting: The environment variable that sets it, named in the error.
        ready: What ``/readyz`` asks.
        log: Where the endpoint is announced.

    Raises:
        RelayNotStarted: ``address`` is not ``host:port`` or cannot be listened on.
    """
    if not address:
        return None
    try:
        host, port = parse_address(address)
        health = HealthServer(host, port, ready=ready)
        await health.start()
    except (ValueError, OSError) as err:
        raise RelayNotStarted(
            f"cannot serve health checks on {address} ({err}); set {setting} to a free"
            " host:port, or to nothing for none"
        ) from None
    log.info("health checks on http://%s/livez and /readyz", address)
    return health
