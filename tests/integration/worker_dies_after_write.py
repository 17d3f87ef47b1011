"""A spicesync worker that SIGKILLs itself the moment one kind of write has landed.

Run as ``python -m tests.integration.worker_dies_after_write STEP`` with a worker's environment;
``STEP`` is ``insert_created_row`` (the App DB row committed) or ``write_memberships`` (SpiceDB
acknowledged the write). It reproduces, deterministically, a worker lost right after a write:
if that write ran inside the workflow task that accepts the event, the task dies with the
worker, times out, and takes the event's acceptance with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from temporalio import activity

from activities.memberships import MembershipActivities
from activities.user_rows import UserRowActivities
from spicesync.models import (
    InsertCreatedRowInput,
    InsertCreatedRowResult,
    WriteMembershipsInput,
    WriteMembershipsResult,
)
from spicesync.settings import load_settings
from workers import worker as worker_module


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _DiesAfterInsert(UserRowActivities):
    @activity.defn(name="insert_created_row")
    async def insert_created_row(self, request: InsertCreatedRowInput) -> InsertCreatedRowResult:
        result = await super().insert_created_row(request)
        _die()
        return result


_slowed = False


class _SlowOnceAfterInsert(UserRowActivities):
    @activity.defn(name="insert_created_row")
    async def insert_created_row(self, request: InsertCreatedRowInput) -> InsertCreatedRowResult:
        global _slowed
        result = await super().insert_created_row(request)
        if not _slowed:
            _slowed = True
            await asyncio.sleep(20)
        return result


class _DiesAfterSpiceDBWrite(MembershipActivities):
    @activity.defn(name="write_memberships")
    async def write_memberships(self, request: WriteMembershipsInput) -> WriteMembershipsResult:
        result = await super().write_memberships(request)
        _die()
        return result


if __name__ == "__main__":
    if sys.argv[1] == "insert_created_row":
        worker_module.UserRowActivities = _DiesAfterInsert  # type: ignore[misc]
    elif sys.argv[1] == "slow_insert":
        import spicesync.constants

        spicesync.constants.LOCAL_STEP_TIMEOUT = 30.0  # type: ignore[misc]
        worker_module.UserRowActivities = _SlowOnceAfterInsert  # type: ignore[misc]
    else:
        worker_module.MembershipActivities = _DiesAfterSpiceDBWrite  # type: ignore[misc]
    asyncio.run(worker_module.run_worker(load_settings()))
