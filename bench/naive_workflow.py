"""The design card's literal shape: a row activity, then a SpiceDB activity, nothing more.

The baseline most teams would write first (issue 16): no ordering across a user's events, no
compensation, no local activities, the SDK's plain :class:`RetryPolicy`. Its activities are in
:mod:`bench.naive_activities`; this module stays free of side effects for the workflow sandbox.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from spicesync.models import CreateUserInput

__all__ = ["NAIVE_RETRY", "NaiveTwoActivityWorkflow"]

# Plain: exponential backoff from 1 s, a few attempts, then the workflow fails (no compensation).
NAIVE_RETRY = RetryPolicy(maximum_attempts=5)
_TIMEOUT = timedelta(seconds=10)


@workflow.defn
class NaiveTwoActivityWorkflow:
    """Insert the user's row, then write the user's membership to SpiceDB."""

    @workflow.run
    async def run(self, user: CreateUserInput) -> None:
        """Two activities in sequence, each retried on its own."""
        await workflow.execute_activity(
            "naive_insert_row", user, start_to_close_timeout=_TIMEOUT, retry_policy=NAIVE_RETRY
        )
        await workflow.execute_activity(
            "naive_write_spicedb", user, start_to_close_timeout=_TIMEOUT, retry_policy=NAIVE_RETRY
        )
