"""One scenario's stage: fresh stores, a queue and workers of its own, and the final judgement."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from temporalio.client import Client

from chaos.engines import SpiceDBEngine, TemporalServer, WorkerProcesses
from chaos.load import collect_outcomes
from chaos.verdict import ScenarioResult, judge
from spicesync.db import with_database
from spicesync.models import CreateUserInput
from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient, connect_spicedb
from spicesync.stack.components import prepare_app_db
from spicesync.temporal import workers_polling

__all__ = ["ChaosRun", "Scene", "new_scene"]


@dataclass
class ChaosRun:
    """What every scenario of one ``spicesync chaos`` invocation shares."""

    settings: Settings
    temporal: TemporalServer
    client: Client
    directory: Path
    users: int
    outage_seconds: float


@dataclass
class Scene:
    """One scenario's own App DB, SpiceDB engine, task queue and workers."""

    run: ChaosRun
    result: ScenarioResult
    task_queue: str
    org_id: str
    database_url: str
    pool: asyncpg.Pool
    engine: SpiceDBEngine
    spicedb: SpiceDBClient
    workers: WorkerProcesses

    @property
    def client(self) -> Client:
        """The app's Temporal client."""
        return self.run.client

    async def wait_for_workers(self, timeout: float = 60.0) -> None:
        """Until a worker polls this scenario's queue."""
        deadline = time.monotonic() + timeout
        while not await workers_polling(self.client, self.task_queue):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.result.scenario}: no worker polled within {timeout} s")
            await asyncio.sleep(0.2)

    async def finish(
        self,
        accepted: list[CreateUserInput],
        *,
        healed_at: float | None,
        expect_failed: dict[str, str] | None = None,
        outcomes: dict[str, str] | None = None,
        unaccepted: list[CreateUserInput] | None = None,
    ) -> dict[str, str]:
        """Wait for every accepted user's outcome, then judge the stores.

        Args:
            accepted: Users whose event was accepted.
            healed_at: ``time.monotonic()`` when the fault ended; recovery is measured from it.
            expect_failed: Users that must fail, with their error type.
            outcomes: Outcomes already collected (the caller had to, e.g. to repair first).
            unaccepted: Users whose call the app gave up on (see :func:`chaos.verdict.judge`).

        Returns:
            The outcomes.
        """
        if outcomes is None:
            outcomes = await collect_outcomes(self.client, self.task_queue, accepted)
        if healed_at is not None and self.result.recovery_seconds is None:
            self.result.recovery_seconds = round(time.monotonic() - healed_at, 1)
        await judge(
            self.result,
            pool=self.pool,
            spicedb=self.spicedb,
            client=self.client,
            task_queue=self.task_queue,
            accepted=accepted,
            outcomes=outcomes,
            expect_failed=expect_failed,
            unaccepted=unaccepted,
        )
        return outcomes


@asynccontextmanager
async def new_scene(run: ChaosRun, name: str) -> AsyncIterator[Scene]:
    """Fresh stores and a fresh queue for scenario ``name``; everything is removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    database = f"spicesync_chaos_{tag}"
    admin = await asyncpg.connect(run.settings.require_database_url())
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = with_database(run.settings.require_database_url(), database)
    engine = SpiceDBEngine(run.directory)
    pool: asyncpg.Pool | None = None
    spicedb: SpiceDBClient | None = None
    workers: WorkerProcesses | None = None
    try:
        await prepare_app_db(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=10)
        assert pool is not None
        await engine.start()
        spicedb = connect_spicedb(engine.endpoint, engine.key)
        task_queue = f"chaos-{name}-{tag}"
        workers = WorkerProcesses(
            settings=run.settings,
            task_queue=task_queue,
            database_url=url,
            spicedb_endpoint=engine.endpoint,
            spicedb_key=engine.key,
            log=run.directory / f"worker-{name}.log",
            trace_file=run.directory / f"traces-{name}.jsonl",
        )
        yield Scene(
            run=run,
            result=ScenarioResult(scenario=name),
            task_queue=task_queue,
            org_id=f"chaos-{tag}",
            database_url=url,
            pool=pool,
            engine=engine,
            spicedb=spicedb,
            workers=workers,
        )
    finally:
        if workers is not None:
            await workers.crash_all()
        if spicedb is not None:
            await spicedb.close()
        engine.kill()
        if pool is not None:
            await pool.close()
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        await admin.close()
