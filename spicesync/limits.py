"""Bounds on what an operator asks for: one place for the models' constraints and the CLI's checks.

Importing nothing, so the command line can check its arguments without loading the SDK.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BACKFILL_BATCH_SIZE_MAX",
    "BACKFILL_LANES_MAX",
    "OUTBOX_BATCH_SIZE_MAX",
    "OUTBOX_CONCURRENCY_MAX",
    "PRESHARED_KEY_MIN_CHARS",
    "RECONCILE_PAGE_SIZE_MAX",
    "SCHEDULE_INTERVAL_SECONDS_MAX",
    "SCHEDULE_INTERVAL_SECONDS_MIN",
]

# Rows one reconcile page scans (one activity; its CheckBulkPermissions carries one item a row).
RECONCILE_PAGE_SIZE_MAX: Final = 1000

# A Temporal Schedule's interval: the server refuses one under a second ("interval is too
# small") and a protobuf Duration over 10,000 years.
SCHEDULE_INTERVAL_SECONDS_MIN: Final = 1.0
SCHEDULE_INTERVAL_SECONDS_MAX: Final = 10_000 * 365 * 86_400.0

# Users one backfill batch writes: SpiceDB takes at most 1,000 updates in one WriteRelationships
# by default, one a user (its membership); a batch that writes version markers too (two a user)
# writes half as many (activities/backfill.py).
BACKFILL_BATCH_SIZE_MAX: Final = 1000

# Disjoint id ranges a backfill writes side by side.
BACKFILL_LANES_MAX: Final = 16

# Outbox rows one relay claims at once: their row locks are held, in one transaction, until
# Temporal has answered for every user in the batch.
OUTBOX_BATCH_SIZE_MAX: Final = 10_000

# Change messages the CDC relay reads from its slot at once (PostgreSQL returns whole
# transactions, so a bigger transaction is still read whole).
CDC_BATCH_SIZE_MAX: Final = 100_000

# Deliveries one relay has in flight at once (signal-with-start calls on one Temporal client).
OUTBOX_CONCURRENCY_MAX: Final = 1000

# The shortest SpiceDB preshared key production accepts: the local stack generates 32 characters
# (``secrets.token_urlsafe(24)``, 192 random bits); a shorter one is guessable or a placeholder.
PRESHARED_KEY_MIN_CHARS: Final = 32
