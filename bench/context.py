"""What every system under test is given: the engines, fresh for each measurement."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from temporalio.client import Client

from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient

__all__ = ["BenchContext"]


@dataclass
class BenchContext:
    """Connections and addresses for one cell (one system at one rate)."""

    settings: Settings
    client: Client
    database_url: str
    pool: asyncpg.Pool
    spicedb_endpoint: str
    spicedb_key: str
    spicedb: SpiceDBClient
    task_queue: str
    nats_url: str | None
    run: str

    def worker_env(self) -> dict[str, str]:
        """Environment for a worker process of any system: the same engines as the generator."""
        env = self.settings.worker_environment(
            task_queue=self.task_queue,
            database_url=self.database_url,
            spicedb_endpoint=self.spicedb_endpoint,
            spicedb_key=self.spicedb_key,
        )
        # The workers' spans go beside the stack's other logs (not to a folder at the root of
        # the filesystem, which the workers' placeholder state folder would give).
        traces = self.settings.state_dir.resolve() / "logs" / f"bench-{self.run}-traces.jsonl"
        return env | {
            "BENCH_NATS_URL": self.nats_url or "",
            "BENCH_RUN": self.run,
            "SPICESYNC_TRACE_FILE": str(traces),
        }
