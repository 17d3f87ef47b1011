"""Record the histories the replay test replays: ``python -m tests.histories.record``.

Runs against the local stack (``spicesync stack up``) with a worker of its own, creates one user
that syncs and one that is refused (duplicate email, compensated), and saves both histories as
JSON next to this file. Re-record when a workflow change is meant to be incompatible, and say so
in the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

from spicesync.models import CreateUserInput
from spicesync.settings import load_settings
from spicesync.temporal import connect_temporal
from starters.create_user import UserCreationFailed, create_user
from workers.worker import build_worker, open_resources

HERE = Path(__file__).parent


async def record() -> None:
    settings = load_settings()
    client = await connect_temporal(settings)
    task_queue = f"record-{uuid.uuid4()}"
    org = f"replay-{uuid.uuid4().hex[:8]}"
    synced = CreateUserInput(
        user_id=str(uuid.uuid4()),
        email=f"r-{org}@example.com",
        name="Replay",
        org_id=org,
        role="admin",
    )
    refused = synced.model_copy(
        update={"user_id": str(uuid.uuid4()), "email": synced.email.upper()}
    )
    async with (
        open_resources(settings) as resources,
        build_worker(client, resources, task_queue=task_queue),
    ):
        await create_user(synced, client=client, task_queue=task_queue)
        with contextlib.suppress(UserCreationFailed):
            await create_user(refused, client=client, task_queue=task_queue)
    for name, event in (("create_user_synced", synced), ("create_user_compensated", refused)):
        history = await client.get_workflow_handle(f"create-user-{event.user_id}").fetch_history()
        (HERE / f"{name}.json").write_text(history.to_json())
        print(f"wrote {name}.json")


if __name__ == "__main__":
    asyncio.run(record())
