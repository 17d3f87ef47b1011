"""What application code calls: create a user, change the role, move the user, delete the user.

Runs against the local stack, with a worker serving it:

    .venv/bin/spicesync stack up
    .venv/bin/spicesync worker &
    .venv/bin/python examples/create_user.py

Each event's outcome is printed as one JSON line (opaque ids, status, ZedToken). The test suite
runs this file as it is (``tests/integration/test_cli_ux.py``), and the README quotes it.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from spicesync.models import CreateUserInput
from spicesync.settings import load_settings
from spicesync.spicedb import connect_spicedb, has_org_permission
from spicesync.temporal import connect_temporal
from starters import WaitFor, change_role, create_user, delete_user, move_user


async def main() -> None:
    """Deliver one user's four lifecycle events and check a permission after the role change."""
    settings = load_settings()  # the stack's stack.env, or the environment
    temporal_client = await connect_temporal(settings)  # encrypted pydantic data converter
    user_id = str(uuid.uuid4())  # the app's own id for the user, a UUID
    email = f"ada-{user_id[:8]}@example.com"

    user = CreateUserInput(user_id=user_id, email=email, name="Ada", org_id="acme")
    out = await create_user(user, wait=WaitFor.ROW, client=temporal_client)  # "201 Created" now
    print(out.model_dump_json())
    out = await change_role(user_id, org_id="acme", role="admin", version=2, client=temporal_client)
    print(out.model_dump_json())

    # out.zed_token: ask CheckPermission for at_least_as_fresh this token
    spicedb = connect_spicedb(*settings.require_spicedb(), insecure=settings.spicedb_insecure)
    try:
        may_manage = await has_org_permission(
            spicedb, user_id=user_id, org_id="acme", permission="manage", zed_token=out.zed_token
        )
    finally:
        await spicedb.close()
    print(json.dumps({"manage_acme_after_role_change": may_manage}))

    out = await move_user(
        user_id, org_id="globex", role="member", version=3, client=temporal_client
    )
    print(out.model_dump_json())
    out = await delete_user(user_id, version=4, client=temporal_client)
    print(out.model_dump_json())


if __name__ == "__main__":
    asyncio.run(main())
