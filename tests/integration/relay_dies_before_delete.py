"""An outbox relay that is signalled the moment Temporal has accepted a batch, before the delete.

Run as ``python -m tests.integration.relay_dies_before_delete HOW`` with a relay's environment.
``HOW`` is ``kill`` (SIGKILL: the process dies between Temporal's accept and the outbox delete,
the one gap where a change is delivered and its rows stay) or ``term`` (SIGTERM: a graceful stop
arriving mid-batch, which must still finish the batch, delete its rows and exit 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence

import asyncpg

from spicesync.logs import configure_logging
from spicesync.settings import load_settings
from workers import outbox_relay as relay_module


class _KilledBeforeDelete(relay_module.OutboxRelay):
    async def delete_relayed(
        self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], seqs: Sequence[int]
    ) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
        await super().delete_relayed(conn, seqs)  # never reached


class _StoppedBeforeDelete(relay_module.OutboxRelay):
    async def delete_relayed(
        self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], seqs: Sequence[int]
    ) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.5)  # the handler runs: the stop is seen in the middle of the batch
        await super().delete_relayed(conn, seqs)


if __name__ == "__main__":
    relay_module.OutboxRelay = (  # type: ignore[misc]
        _KilledBeforeDelete if sys.argv[1] == "kill" else _StoppedBeforeDelete
    )
    configure_logging()
    asyncio.run(relay_module.run_outbox_relay(load_settings()))
