"""A schema mismatch parks the sync (no compensation) until the schema is fixed and resumed."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from temporalio.client import Client

from spicesync.constants import user_workflow_id
from spicesync.models import ResumeInput
from spicesync.spicedb import check_schema, connect_spicedb, load_schema, write_schema
from spicesync.stack.components import start_spicedb, wait_for_spicedb
from spicesync.stack.processes import free_port, stop_pid, wait_for_port
from starters.stuck import find_stuck
from starters.user_events import WaitFor, create_user
from tests.conftest import SpiceDBServer
from tests.integration.conftest import (
    Pipeline,
    assert_synced,
    eventually,
    new_event,
    user_row,
    worker_settings,
)
from workers.worker import build_worker, open_resources
from workflows.user_sync import LAST_ERROR, STAGE, UserSyncWorkflow

pytestmark = pytest.mark.integration


async def test_schema_mismatch_parks_then_completes_after_fix_and_resume(
    client: Client, task_queue: str, database_url: str, app_db: asyncpg.Pool, tmp_path: Path
) -> None:
    port, key, log = free_port(), f"k-{uuid.uuid4().hex}", tmp_path / "spicedb.log"
    pid, _ = start_spicedb(port=port, preshared_key=key, log=log)
    wait_for_port("127.0.0.1", port, pid=pid, timeout=60, log=log)
    server = SpiceDBServer(f"127.0.0.1:{port}", key, pid, log)
    admin = connect_spicedb(server.endpoint, key)
    try:
        await wait_for_spicedb(server.endpoint, key)
        # An operator's mistake: a schema without the `admin` relation spicesync writes.
        broken = (
            load_schema()
            .replace("relation admin: user", "")
            .replace("permission manage = admin", "permission manage = member")
            .replace("permission view = admin + member", "permission view = member")
        )
        await write_schema(admin, broken)
        assert await check_schema(admin) == ["organization#admin: user"]

        user = new_event(role="admin")
        async with (
            open_resources(worker_settings(database_url, server)) as resources,
            build_worker(client, resources, task_queue=task_queue),
        ):
            await create_user(user, wait=WaitFor.START, client=client, task_queue=task_queue)
            handle = client.get_workflow_handle_for(
                UserSyncWorkflow.run, user_workflow_id(user.user_id)
            )

            async def parked() -> bool:
                attributes = (await handle.describe()).typed_search_attributes
                return attributes.get(STAGE) == "parked"

            await eventually(parked, timeout=60)
            attributes = (await handle.describe()).typed_search_attributes
            assert attributes.get(LAST_ERROR) == "SchemaMismatch"
            # Parked, not compensated: the row waits, pending, and nothing was half-written.
            row = await user_row(app_db, user.user_id)
            assert row is not None and row["sync_status"] == "pending"
            assert any(
                s.user_id == user.user_id for s in await find_stuck(client, older_than=timedelta(0))
            )

            await write_schema(admin)  # the fix
            assert await check_schema(admin) == []
            resumed = await handle.execute_update(UserSyncWorkflow.resume, ResumeInput())
            assert resumed.resumed
            done = await create_user(user, client=client, task_queue=task_queue)
            check = Pipeline(client, task_queue, app_db, admin)
            await assert_synced(check, user, done.zed_token or "")
            again = await handle.execute_update(UserSyncWorkflow.resume, ResumeInput())
            assert not again.resumed  # nothing parked any more
    finally:
        await admin.close()
        stop_pid(pid)
