"""The search attributes a user's sync keeps current, for the UI and ``spicesync stuck``.

Shared by owned mode's and follow mode's per-user workflows; values are opaque ids, stage names
and error types only.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate

__all__ = ["LAST_ERROR", "ORG_ID", "STAGE", "STAGE_SINCE", "USER_ID", "set_stage"]

STAGE = SearchAttributeKey.for_keyword("SpicesyncStage")
STAGE_SINCE = SearchAttributeKey.for_datetime("SpicesyncStageSince")
LAST_ERROR = SearchAttributeKey.for_keyword("SpicesyncLastError")
USER_ID = SearchAttributeKey.for_keyword("SpicesyncUserId")
ORG_ID = SearchAttributeKey.for_keyword("SpicesyncOrgId")


def set_stage(stage: str, *, error: str | None = None, clear_error: bool = False) -> None:
    """Record the stage the sync is in now (and the error that put it there, if any).

    Kept current so the UI and `spicesync stuck` can find, e.g., every sync that has been
    writing to SpiceDB for more than five minutes.

    Args:
        stage: The stage's name (``ACTIVE_STAGES`` lists those where a sync can be stuck).
        error: The error type to show as ``SpicesyncLastError``.
        clear_error: Remove ``SpicesyncLastError`` (the failure it named is over).
    """
    updates: list[SearchAttributeUpdate[Any]] = [
        STAGE.value_set(stage),
        STAGE_SINCE.value_set(workflow.now()),
    ]
    if error is not None:
        updates.append(LAST_ERROR.value_set(error))
    elif clear_error:
        updates.append(LAST_ERROR.value_unset())
    workflow.upsert_search_attributes(updates)
