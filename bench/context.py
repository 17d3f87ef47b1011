"""What every system under test is given: the engines, fresh for each measurement."""

from __future__ import annotations

import os
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
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_URL", "SPICESYNC_"))
        }
        env = base | {
            "TEMPORAL_ADDRESS": self.settings.temporal_address,
            "TEMPORAL_NAMESPACE": self.settings.temporal_namespace,
            "DATABASE_URL": self.database_url,
            "SPICEDB_ENDPOINT": self.spicedb_endpoint,
            "SPICEDB_PRESHARED_KEY": self.spicedb_key,
            "SPICESYNC_TASK_QUEUE": self.task_queue,
            "SPICESYNC_METRICS_ADDRESS": "",
            "SPICESYNC_STATE_DIR": "/nonexistent-bench-state",
            "BENCH_NATS_URL": self.nats_url or "",
            "BENCH_RUN": self.run,
        }
        if self.settings.encryption_keys is not None:
            env["SPICESYNC_ENCRYPTION_KEYS"] = self.settings.encryption_keys.get_secret_value()
        if self.settings.encryption_key_id:
            env["SPICESYNC_ENCRYPTION_KEY_ID"] = self.settings.encryption_key_id
        return env
