"""The seed's pattern 2: the row, an event on NATS JetStream, a consumer that writes SpiceDB.

The request inserts the row and publishes; the consumer writes SpiceDB and retries through
JetStream's redelivery (nak with a delay).

Written to be fair: the consumer fetches batches and writes each batch in one WriteRelationships,
acks only after both stores are written, and publishes with a message id so JetStream drops a
duplicate publish.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from typing import Any

import asyncpg
import nats
from nats.js.api import StreamConfig
from nats.js.client import JetStreamContext

from bench.context import BenchContext
from bench.rows import INSERT_ROW, mark_synced, row_args, row_completions, write_memberships
from spicesync.models import CreateUserInput
from spicesync.spicedb import connect_spicedb

__all__ = ["NatsSyncSystem"]

_BATCH = 100


def _names(run: str) -> tuple[str, str]:
    return f"BENCH_{run}", f"bench.{run}.users"


class NatsSyncSystem:
    """Row + JetStream publish in the request; a consumer process does SpiceDB."""

    name = "event-driven (NATS JetStream)"
    uses_nats = True  # the NATS server is one of its processes (CPU accounting)
    has_rows = True
    uses_temporal = False  # the dev server is not one of its processes (CPU accounting)

    def __init__(self) -> None:
        self._js: JetStreamContext | None = None
        self._nc: Any = None

    def worker_command(self) -> list[str]:
        """The consumer process."""
        return [sys.executable, "-m", "bench.nats_sync"]

    async def prepare(self, ctx: BenchContext) -> None:
        """Create the stream (the consumer creates its durable consumer)."""
        assert ctx.nats_url is not None
        self._nc = await nats.connect(ctx.nats_url)
        self._js = self._nc.jetstream()
        stream, subject = _names(ctx.run)
        await self._js.add_stream(StreamConfig(name=stream, subjects=[subject]))

    async def close(self, ctx: BenchContext) -> None:
        """Drop the stream."""
        if self._js is not None:
            await self._js.delete_stream(_names(ctx.run)[0])
        if self._nc is not None:
            await self._nc.close()

    async def submit(self, ctx: BenchContext, user: CreateUserInput) -> None:
        """Insert the row, then publish the event (acked by JetStream: durably stored)."""
        assert self._js is not None
        await ctx.pool.execute(INSERT_ROW, *row_args(user))
        payload = json.dumps([user.user_id, user.org_id, user.role]).encode()
        await self._js.publish(_names(ctx.run)[1], payload, headers={"Nats-Msg-Id": user.user_id})

    async def completions(
        self, ctx: BenchContext, user_ids: list[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        """From the rows."""
        return await row_completions(ctx, user_ids)


async def _consume() -> None:
    run = os.environ["BENCH_RUN"]
    stream, subject = _names(run)
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=2, max_size=10)
    assert pool is not None
    spicedb = connect_spicedb(os.environ["SPICEDB_ENDPOINT"], os.environ["SPICEDB_PRESHARED_KEY"])
    nc = await nats.connect(os.environ["BENCH_NATS_URL"])
    js = nc.jetstream()
    subscription = await js.pull_subscribe(subject, durable=f"sync-{run}", stream=stream)
    while True:
        try:
            # A long poll: it returns as soon as messages arrive. A very short one can expire
            # while messages are on their way, and those wait out the ack timeout (30 s) before
            # JetStream delivers them again: on a busy box, past the bench's drain.
            messages = await subscription.fetch(_BATCH, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        users: list[tuple[str, str, str]] = [tuple(json.loads(m.data)) for m in messages]
        try:
            token = await write_memberships(spicedb, users)
            await mark_synced(pool, [u[0] for u in users], token)
        except Exception:
            # The hand-written retry: JetStream redelivers after the delay.
            await asyncio.gather(*(m.nak(delay=1.0) for m in messages))
            continue
        await asyncio.gather(*(m.ack() for m in messages))


if __name__ == "__main__":
    asyncio.run(_consume())
