"""Backfill comparison: spicesync's backfill against the raw bulk path, on the same engines.

The raw path is what a one-off script would do: COPY the rows into PostgreSQL, then push the
memberships into SpiceDB as fast as it takes them (``ImportBulkRelationships`` when the engine
serves it, else WriteRelationships of 1,000 CREATEs per call), with no version marker, no lock
and no safety beside live syncs. spicesync's backfill runs as ``spicesync backfill`` does, on a
worker process.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from typing import Any

import grpc.aio
from authzed.api.v1 import RelationshipUpdate, WriteRelationshipsRequest
from authzed.api.v1.permission_service_pb2 import ImportBulkRelationshipsRequest

from bench.cells import cell_context, fresh_spicedb, spawn_worker, users_held, wait_ready
from bench.harness import new_user
from bench.pipeline import PipelineSystem
from spicesync.models import BackfillInput, CreateUserInput, Membership
from spicesync.settings import Settings
from spicesync.spicedb import SpiceDBClient, connect_spicedb, membership_relationship
from spicesync.stack.processes import stop_pid, stop_process
from starters.backfill import start_backfill

__all__ = ["run_backfill_bench"]

_CREATE = RelationshipUpdate.Operation.OPERATION_CREATE


async def _raw_import(spicedb: SpiceDBClient, users: list[CreateUserInput]) -> str:
    relationships = [
        membership_relationship(Membership(user_id=u.user_id, org_id=u.org_id, role=u.role))
        for u in users
    ]

    async def chunks() -> Any:
        for start in range(0, len(relationships), 1000):
            yield ImportBulkRelationshipsRequest(relationships=relationships[start : start + 1000])

    try:
        await spicedb.ImportBulkRelationships(chunks(), timeout=300)
        return "ImportBulkRelationships"
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass  # the embedded engine's streaming proxy does not take client streams
    for start in range(0, len(relationships), 1000):
        await spicedb.WriteRelationships(
            WriteRelationshipsRequest(
                updates=[
                    RelationshipUpdate(operation=_CREATE, relationship=r)
                    for r in relationships[start : start + 1000]
                ]
            ),
            timeout=60,
        )
    return "WriteRelationships, 1,000 CREATEs per call"


async def run_backfill_bench(
    count: int, options: Any, settings: Settings, shared: dict[str, Any]
) -> dict[str, Any]:
    """Measure both paths for ``count`` users; returns figures and a ``summary`` entry."""
    pool = shared["pool"]
    await pool.execute("TRUNCATE users")
    run = uuid.uuid4().hex[:8]
    users = [new_user(run, i) for i in range(count)]
    print(f"  backfill: {count} users", file=sys.stderr, flush=True)

    began = time.perf_counter()
    await pool.copy_records_to_table(
        "users",
        records=[(uuid.UUID(u.user_id), u.email, u.name, u.org_id, u.role) for u in users],
        columns=["id", "email", "name", "org_id", "role"],
    )
    copy_seconds = time.perf_counter() - began

    pid, endpoint, key = await fresh_spicedb(options.out / "logs")
    raw_client = connect_spicedb(endpoint, key)
    try:
        began = time.perf_counter()
        method = await _raw_import(raw_client, users)
        raw_seconds = time.perf_counter() - began
    finally:
        await raw_client.close()
        stop_pid(pid)

    pid, endpoint, key = await fresh_spicedb(options.out / "logs")
    spicedb = connect_spicedb(endpoint, key)
    ctx = cell_context(
        options.nats_url, settings, shared, endpoint, key, spicedb, run, f"bench-backfill-{run}"
    )
    worker = await spawn_worker(PipelineSystem().worker_command(), ctx, options.out / "logs")
    try:
        await wait_ready(ctx, PipelineSystem())
        began = time.perf_counter()
        handle = await start_backfill(
            BackfillInput(lanes=2),
            client=ctx.client,
            task_queue=ctx.task_queue,
            workflow_id=f"bench-backfill-{run}",
        )
        result = await handle.result()
        spicesync_seconds = time.perf_counter() - began
        sample = random.Random(1).sample(users, min(1000, count))
        held = await users_held(spicedb, sample)
    finally:
        await stop_process(worker)
        await spicedb.close()
        stop_pid(pid)

    raw_rate = count / raw_seconds
    ours = result.progress.written_users / spicesync_seconds
    return {
        "users": count,
        "copy_rows_per_second": round(count / copy_seconds),
        "raw_method": method,
        "raw_users_per_second": round(raw_rate),
        "raw_relationships_per_second": round(count / raw_seconds),
        "spicesync_users_per_second": round(ours),
        "spicesync_relationships_per_second": round(
            result.progress.relationships_written / spicesync_seconds
        ),
        "spicesync_version_markers": result.progress.version_markers,
        "spicesync_reported_rows_scanned_per_second": result.rows_scanned_per_second,
        "spicesync_written_users": result.progress.written_users,
        "sample_checked": len(sample),
        "sample_holding": len(held),
        "summary": {
            "backfill users/s: spicesync / raw bulk (target ≥ 0.5)": (
                f"{ours:,.0f} / {raw_rate:,.0f} = {ours / raw_rate:.2f}"
                f" ({count:,} users; raw: COPY {count / copy_seconds:,.0f} rows/s, then {method})"
            ),
        },
    }
