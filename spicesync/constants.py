"""Names shared by workers, starters, the stack and the tests, kept in one place."""

from __future__ import annotations

import uuid
from typing import Final

__all__ = [
    "ACTIVITY_START_TO_CLOSE",
    "CREATE_USER_WORKFLOW_ID_PREFIX",
    "DEFAULT_TASK_QUEUE",
    "SEARCH_ATTRIBUTES",
    "SPICEDB_CALL_TIMEOUT_SECONDS",
    "create_user_workflow_id",
]

DEFAULT_TASK_QUEUE: Final = "spicesync-users"

CREATE_USER_WORKFLOW_ID_PREFIX: Final = "create-user-"

# Search attributes the stack registers on the dev server. Values are opaque ids only.
SEARCH_ATTRIBUTES: Final[dict[str, str]] = {
    "SpicesyncUserId": "Keyword",
    "SpicesyncOrgId": "Keyword",
    "SpicesyncStage": "Keyword",
}

# One attempt of an activity; retries are the RetryPolicy's job, so keep each try short.
ACTIVITY_START_TO_CLOSE: Final = 15.0

# A SpiceDB call that has not answered in this time is treated as DEADLINE_EXCEEDED (transient).
SPICEDB_CALL_TIMEOUT_SECONDS: Final = 5.0


def create_user_workflow_id(user_id: uuid.UUID | str) -> str:
    """Return the workflow id for creating ``user_id``.

    The id is derived from the business key alone, so a duplicate event for the same user maps
    onto the same workflow and Temporal itself makes it a no-op.

    Args:
        user_id: The user's UUID.

    Returns:
        The workflow id; it carries only the opaque user id.
    """
    return f"{CREATE_USER_WORKFLOW_ID_PREFIX}{uuid.UUID(str(user_id))}"
