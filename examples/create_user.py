"""What application code calls: create a user, change the role, move the user, delete the user.

It needs only the ``spicesync-client`` distribution (docs/packaging.md) and, for the permission
check, the app's own SpiceDB client (``authzed``). Runs against the local stack, with a worker
serving it:

    .venv/bin/spicesync stack up
    .venv/bin/spicesync worker &
    .venv/bin/python examples/create_user.py

Each event's outcome is printed as one JSON line (opaque ids, status, ZedToken). The test suite
runs this file as it is (``tests/integration/test_cli_ux.py``, and from a clean virtual
environment with only the client wheel installed in ``tests/integration/test_client_wheel.py``),
and the README quotes it.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from authzed.api.v1 import (
    AsyncClient,
    CheckPermissionRequest,
    CheckPermissionResponse,
    Consistency,
    ObjectReference,
    SubjectReference,
    ZedToken,
)
from grpcutil import bearer_token_credentials, insecure_bearer_token_credentials

from spicesync.client import (
    WaitFor,
    change_role,
    connect_temporal,
    create_user,
    delete_user,
    load_settings,
    move_user,
)
from spicesync.models import CreateUserInput


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
    endpoint, key = settings.require_spicedb()
    credentials = (
        insecure_bearer_token_credentials if settings.spicedb_insecure else bearer_token_credentials
    )
    spicedb = AsyncClient(endpoint, credentials(key))  # the app's own SpiceDB client
    check = await spicedb.CheckPermission(
        CheckPermissionRequest(
            consistency=Consistency(at_least_as_fresh=ZedToken(token=out.zed_token)),
            resource=ObjectReference(object_type="organization", object_id="acme"),
            permission="manage",
            subject=SubjectReference(object=ObjectReference(object_type="user", object_id=user_id)),
        )
    )
    may_manage = check.permissionship == CheckPermissionResponse.PERMISSIONSHIP_HAS_PERMISSION
    print(json.dumps({"manage_acme_after_role_change": may_manage}))

    out = await move_user(
        user_id, org_id="globex", role="member", version=3, client=temporal_client
    )
    print(out.model_dump_json())
    out = await delete_user(user_id, version=4, client=temporal_client)
    print(out.model_dump_json())


if __name__ == "__main__":
    asyncio.run(main())
