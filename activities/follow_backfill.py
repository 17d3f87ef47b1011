"""The backfill's step in follow mode: deliver a change to each never-synced user of a page.

Users that existed before spicesync followed the application's table have a row but no
bookkeeping row in ``spicesync_followed_users``. A batch walks one keyset page of the table and
delivers a change (source ``backfill``) to each of those users' workflows, which then sync
level-triggered like any other change. Nothing is written here: a retried batch delivers again,
which is harmless, and a user a live change synced meanwhile only gets a sync with nothing to
write.
"""

from __future__ import annotations

import asyncpg
from temporalio import activity
from temporalio.client import Client

from activities.follow_reconcile import deliver_changes
from spicesync.app_table import AppTable
from spicesync.errors import AppDBUnavailable
from spicesync.mapping import valid_user_id
from spicesync.models import BackfillPageResult, CountFollowedBackfillInput, FollowBackfillPageInput

__all__ = ["FollowBackfillActivities"]

# One delivery per user; a page's deliveries run a few at a time and heartbeat.
MAX_BATCH = 500

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class FollowBackfillActivities:
    """The backfill's follow-mode activities, sharing the worker's pool and Temporal client."""

    def __init__(
        self, pool: asyncpg.Pool, client: Client, task_queue: str, table: AppTable
    ) -> None:
        self._pool = pool
        self._client = client
        self._task_queue = task_queue
        self._table = table

    @activity.defn
    async def count_followed_backfill_candidates(self, _request: CountFollowedBackfillInput) -> int:
        """The rows the backfill walks (for the progress bar).

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
        """
        try:
            return await self._table.count(self._pool)
        except _DB_ERRORS as err:
            raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None

    @activity.defn
    async def deliver_backfill_batch(self, request: FollowBackfillPageInput) -> BackfillPageResult:
        """Deliver a change to each never-synced user of one keyset page.

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
            RPCError: Temporal refused a delivery; retried (delivering twice is harmless).
        """
        size = min(request.batch_size, MAX_BATCH)
        try:
            ids, scanned, last = await self._table.never_synced_page(
                self._pool, request.after_user_id, size
            )
        except _DB_ERRORS as err:
            raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None
        # An id no workflow can have is skipped, never named (it may not be opaque).
        usable = [i for i in ids if valid_user_id(i)]
        delivered, _refused = await deliver_changes(
            self._client, self._task_queue, usable, "backfill"
        )
        return BackfillPageResult(
            scanned=scanned,
            written_users=0,
            skipped=scanned - delivered,
            relationships_written=0,
            zed_token=None,
            next=last if scanned == size else None,
            delivered=delivered,
        )
