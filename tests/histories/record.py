"""Record the histories the replay test replays: ``python -m tests.histories.record``.

Runs against the local stack (``spicesync stack up``) with a worker of its own. One user is
created, changes role, moves and is deleted; another is refused (duplicate email, compensated).
Both histories are saved as JSON next to this file. Re-record when a workflow change is meant
to be incompatible, and say so in the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

from spicesync.constants import user_workflow_id
from spicesync.models import CreateUserInput
from spicesync.settings import load_settings
from spicesync.temporal import connect_temporal
from starters.user_events import UserSyncFailed, change_role, create_user, delete_user, move_user
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
        uid, queue = synced.user_id, {"client": client, "task_queue": task_queue}
        await change_role(uid, org_id=org, role="member", version=2, **queue)  # type: ignore[arg-type]
        await move_user(uid, org_id=f"{org}-b", role="member", version=3, **queue)  # type: ignore[arg-type]
        await delete_user(uid, version=4, **queue)  # type: ignore[arg-type]
        with contextlib.suppress(UserSyncFailed):
            await create_user(refused, client=client, task_queue=task_queue)
    for name, event in (("user_sync_lifecycle", synced), ("user_sync_compensated", refused)):
        history = await client.get_workflow_handle(user_workflow_id(event.user_id)).fetch_history()
        (HERE / f"{name}.json").write_text(history.to_json())
        print(f"wrote {name}.json")


if __name__ == "__main__":
    asyncio.run(record())
