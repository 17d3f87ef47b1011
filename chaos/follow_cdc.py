"""Follow mode fed by change data capture under fire: the app writes plain SQL; the relay dies.

The application is :mod:`chaos.follow`'s (the same table, mapping and stream of inserts, admin
toggles, team moves, renames and deletes), except that it adds nothing at all to its
transactions: ``spicesync relay cdc`` reads them from a logical replication slot of the
scenario's own, and follow-mode workers bring SpiceDB in step. The relay is SIGKILLed at the ¼
and ½ marks of the application's commits, and each restarted relay again
:data:`_SECOND_KILL_SECONDS` into its catch-up (a backlog read, some of it delivered, not all of
it confirmed). The verdict (:func:`chaos.verdict.judge_follow`) compares SpiceDB, read
independently, with what each row implies now, and requires the slot to have been confirmed past
the application's last commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Final

import asyncpg

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

__all__ = ["cdc_relay_killed"]

_MIN_STREAM_SECONDS: Final = 20.0
_RESTART_AFTER_SECONDS: Final = 1.0
# A restarted relay is killed again this long after it follows the table (its catch-up).
_SECOND_KILL_SECONDS: Final = 1.5
_CONVERGE_SECONDS: Final = 600.0
_FOLLOWING: Final = "cdc relay following"
_CONFIRMED: Final = "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1"


class _Killer:
    """Kills the relay twice at each mark of the application's commits, and restarts it."""

    def __init__(self, relays: WorkerProcesses, log: Path) -> None:
        self.relays, self.log = relays, log
        self.committed = self.kills = 0
        self.killed_at: list[int] = []
        self.restarted: list[float] = []
        self._progress = asyncio.Event()

    def commit(self, count: int) -> None:
        self.committed = count
        self._progress.set()

    def _following(self) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count(_FOLLOWING)

    async def start(self, pause: float = 0.0) -> None:
        """Start a relay (after ``pause``); until it follows the table (its slot exists)."""
        await asyncio.sleep(pause)
        before = self._following()
        await self.relays.start()
        deadline = time.monotonic() + 120
        while self._following() <= before:
            if time.monotonic() > deadline:
                raise RuntimeError("the CDC relay did not follow the table within 120 s")
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


async def _write(pool: asyncpg.Pool, changes: list[AppChange], rate: float, killer: _Killer) -> int:
    """Commit each change with plain SQL, open loop; the WAL position inside the last one."""
    began = time.monotonic()
    last = 0
    async with pool.acquire() as conn:
        for i, change in enumerate(changes):
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with conn.transaction():
                await app_statement(conn, change)
                if i == len(changes) - 1:
                    last = int(await conn.fetchval("SELECT pg_current_wal_insert_lsn()"))
            killer.commit(i + 1)
    return last


async def _confirmed(pool: asyncpg.Pool, slot: str) -> int:
    return int(await pool.fetchval(_CONFIRMED, slot) or 0)


async def _converge(scene: Scene, slot: str, last: int, users: list[str]) -> float | None:
    """Until the slot is confirmed past the last commit and SpiceDB holds what rows imply."""
    deadline = time.monotonic() + _CONVERGE_SECONDS
    while time.monotonic() < deadline:
        if await _confirmed(scene.pool, slot) > last and follow_in_step(
            await implied(scene.pool, users), await held_by_user(scene.spicedb)
        ):
            return time.monotonic()
        await asyncio.sleep(1)
    return None


async def _drop_slot(pool: asyncpg.Pool, slot: str) -> None:
    """Drop the scenario's slot (a slot nobody reads keeps WAL); a killed reader may linger."""
    for _ in range(50):
        with contextlib.suppress(asyncpg.ObjectInUseError):
            await pool.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = $1",
                slot,
            )
            return
        await asyncio.sleep(0.2)


async def cdc_relay_killed(scene: Scene) -> None:
    """App writes plain SQL; the CDC relay SIGKILLed four times, restarted."""
    await scene.pool.execute(APP_TABLE)
    mapping = scene.run.directory / f"spicesync-{scene.task_queue}.toml"
    mapping.write_text(MAPPING)
    scene.workers.extra_env = {"SPICESYNC_CONFIG": str(mapping)}
    slot = "chaos_cdc_" + scene.task_queue.replace("-", "_")[-24:].lower()
    log = scene.run.directory / "relay-cdc_relay_killed.log"
    relays = replace(
        scene.workers,
        processes=[],
        command=("relay", "cdc"),
        log=log,
        # No metrics or health endpoint: their default ports may be taken.
        extra_env={
            "SPICESYNC_CONFIG": str(mapping),
            "SPICESYNC_CDC_SLOT": slot,
            "SPICESYNC_CDC_PUBLICATION": "chaos_cdc",
            "SPICESYNC_CDC_POLL_SECONDS": "0.2",
            "SPICESYNC_CDC_METRICS_ADDRESS": "",
            "SPICESYNC_CDC_HEALTH_ADDRESS": "",
        },
    )
    changes = list(app_changes(scene.run.users, org=scene.org_id))
    users = list(dict.fromkeys(c.user_id for c in changes))
    rate = min(APP_RATE, len(changes) / _MIN_STREAM_SECONDS)
    marks = [len(changes) // 4, len(changes) // 2]
    killer = _Killer(relays, log)
    await scene.workers.start()
    await scene.wait_for_workers()
    try:
        await killer.start()
        killing = asyncio.create_task(killer.run(marks))
        last = await _write(scene.pool, changes, rate, killer)
        await killing
        converged = await _converge(scene, slot, last, users)
        if converged is not None:
            scene.result.recovery_seconds = round(converged - killer.restarted[-1], 1)
        await judge_follow(
            scene.result,
            spicedb=scene.spicedb,
            client=scene.client,
            task_queue=scene.task_queue,
            implied=await implied(scene.pool, users),
            real_changes=real_changes_per_user(changes),
            outbox_rows=0,
        )
        if await _confirmed(scene.pool, slot) <= last:
            scene.result.problems.append("the slot was never confirmed past the last commit")
            scene.result.passed = False
    finally:
        await relays.crash_all()
        await _drop_slot(scene.pool, slot)
    if killer.kills != 2 * len(marks):
        scene.result.problems.append(
            f"the relay was killed {killer.kills} times, not {2 * len(marks)}"
        )
        scene.result.passed = False
    signals, repeated = await redeliveries(scene.client, users)
    deleted = sum(1 for c in changes if c.kind == "delete")
    scene.result.notes.append(
        f"{len(changes)} application transactions with plain SQL only ({len(users)} inserts,"
        f" {deleted} deletes) at {rate:.0f}/s; relay SIGKILLed {killer.kills} times, restarted"
        f" {_RESTART_AFTER_SECONDS:g} s after each: after"
        f" {', '.join(map(str, killer.killed_at))} transactions"
    )
    scene.result.notes.append(
        f"{signals} changes delivered to the users' workflows, {repeated} of them again after"
        " a kill (the same WAL position delivered twice)"
    )
