"""The CDC relay's PostgreSQL side: checks, the publication, the logical replication slot.

The relay reads the slot through PostgreSQL's SQL interface to logical decoding
(``pg_logical_slot_peek_binary_changes`` with the built-in ``pgoutput`` plugin), on an ordinary
asyncpg connection, and moves the slot's confirmed position with ``pg_replication_slot_advance``
only once Temporal accepted every change before that position (docs/follow-mode.md, "Change
data capture", says why this over the streaming replication protocol).

Nothing here writes the application's table: the publication names it, and the slot reads the
WAL. spicesync's own bookkeeping (``spicesync_cdc_slots``, migration 0008) remembers that a slot
existed, so one that disappears (dropped by hand, or invalidated for retaining too much WAL) is
told apart from a first start, and a reconcile due for it survives a crash of the relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

import asyncpg

from spicesync.app_table import quote
from spicesync.mapping import FollowMapping

__all__ = [
    "CdcNotReady",
    "Conn",
    "SlotState",
    "advance_slot",
    "check_source",
    "ensure_publication",
    "ensure_slot",
    "heartbeat",
    "lag_bytes",
    "peek_changes",
    "reconcile_done",
    "table_oid",
]

PLUGIN: Final = "pgoutput"

# A connection of its own or one of a pool's (a type for the checker only).
Conn: TypeAlias = "asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

_SLOT: Final = """
SELECT database = current_database() AS here, plugin,
       wal_status = 'lost' OR to_jsonb(s) ->> 'invalidation_reason' IS NOT NULL AS invalid
FROM pg_replication_slots s WHERE slot_name = $1
"""
_KEY_COLUMNS: Final = """
SELECT c.relreplident::text AS identity,
       coalesce((SELECT array_agg(a.attname::text) FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = c.oid
                   AND ((c.relreplident = 'd' AND i.indisprimary)
                        OR (c.relreplident = 'i' AND i.indisreplident))), '{}') AS key_columns
FROM pg_class c WHERE c.oid = $1
"""
_PUBLISHES: Final = """
SELECT EXISTS (SELECT 1 FROM pg_publication_tables
               WHERE pubname = $1
                 AND (quote_ident(schemaname) || '.' || quote_ident(tablename))::regclass = $2)
"""
_PEEK: Final = """
SELECT lsn, data FROM pg_logical_slot_peek_binary_changes(
    $1, NULL, $2, 'proto_version', '1', 'publication_names', $3, 'messages', 'true')
"""


class CdcNotReady(RuntimeError):
    """The App DB cannot feed the CDC relay as it is; the message says what to change (one line)."""


@dataclass(frozen=True)
class SlotState:
    """What :func:`ensure_slot` found.

    Attributes:
        created: The slot was created by this call.
        lost: It had existed before (the bookkeeping says so) and was gone or invalidated: what
            happened in between was never read, and a reconcile is due.
        reconcile_due: A reconcile is due and not yet known to be started (this loss, or an
            earlier one the relay died before reporting); its number names its workflow.
        losses: How many times this slot was lost, this time included.
    """

    created: bool
    lost: bool
    reconcile_due: bool
    losses: int


async def table_oid(conn: Conn, mapping: FollowMapping) -> int:
    """The mapped table's oid.

    Raises:
        CdcNotReady: The table does not exist (or is not visible).
    """
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", mapping.source.qualified)
    if oid is None:
        raise CdcNotReady(
            f"{mapping.origin}: source.table: table {mapping.source.table} does not exist"
        )
    return int(oid)


async def check_source(conn: Conn, mapping: FollowMapping) -> int:
    """Check that the server writes logical WAL and that a delete names the user.

    Returns:
        The mapped table's oid.

    Raises:
        CdcNotReady: ``wal_level`` is not ``logical``, the table is missing, or its REPLICA
            IDENTITY does not carry the id column (a DELETE would not say whose row it was).
    """
    wal_level = await conn.fetchval("SHOW wal_level")
    if wal_level != "logical":
        raise CdcNotReady(
            f"the App DB runs with wal_level = {wal_level}; change data capture needs"
            " wal_level = logical (set it in postgresql.conf, or ALTER SYSTEM SET wal_level ="
            " logical, and restart PostgreSQL)"
        )
    oid = await table_oid(conn, mapping)
    row = await conn.fetchrow(_KEY_COLUMNS, oid)
    assert row is not None
    if row["identity"] != "f" and mapping.source.id not in row["key_columns"]:
        table = mapping.source.table
        raise CdcNotReady(
            f"{mapping.source.table}'s REPLICA IDENTITY does not include its id column"
            f" {mapping.source.id}, so a DELETE would not say whose row it was: make"
            f" {mapping.source.id} part of the primary key, or run ALTER TABLE {table}"
            " REPLICA IDENTITY FULL (spicesync never alters your table itself)"
        )
    return oid


async def ensure_publication(
    conn: Conn, publication: str, mapping: FollowMapping, oid: int
) -> bool:
    """Create the publication of the mapped table unless it exists; check it publishes it.

    Returns:
        Whether it was created now.

    Raises:
        CdcNotReady: It exists without the table.
    """
    exists = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", publication
    )
    if not exists:
        try:
            await conn.execute(
                f"CREATE PUBLICATION {quote(publication)} FOR TABLE {mapping.source.qualified}"
            )
        except asyncpg.DuplicateObjectError:
            pass  # another relay (or migrate) made it just now
        else:
            return True
    if not await conn.fetchval(_PUBLISHES, publication, oid):
        raise CdcNotReady(
            f"publication {publication} exists but does not publish {mapping.source.table}:"
            f" ALTER PUBLICATION {publication} ADD TABLE {mapping.source.qualified}, or set"
            " SPICESYNC_CDC_PUBLICATION to another name"
        )
    return False


async def ensure_slot(conn: Conn, slot: str, publication: str) -> SlotState:
    """Create the slot unless it exists and is usable; tell a first start from a lost slot.

    A loss is recorded (``reconcile_due``) before the slot is created again, so a relay killed
    between the two still starts the reconcile when it comes back.

    Raises:
        CdcNotReady: The slot's name is taken by a slot of another database or plugin, or
            spicesync's bookkeeping table is missing (migrations not applied).
    """
    if not await conn.fetchval("SELECT to_regclass('spicesync_cdc_slots') IS NOT NULL"):
        raise CdcNotReady(
            "spicesync_cdc_slots does not exist in DATABASE_URL's database: apply spicesync's"
            " migrations first (`spicesync migrate`)"
        )
    found = await conn.fetchrow(_SLOT, slot)
    if found is not None and (not found["here"] or found["plugin"] != PLUGIN):
        raise CdcNotReady(
            f"replication slot {slot} belongs to another database or plugin: set"
            " SPICESYNC_CDC_SLOT to a name of spicesync's own"
        )
    known = await conn.fetchrow(
        "SELECT times_lost FROM spicesync_cdc_slots WHERE slot_name = $1",
        slot,
    )
    usable = found is not None and not found["invalid"]
    lost = known is not None and not usable
    if lost:
        await conn.execute(
            "UPDATE spicesync_cdc_slots SET times_lost = times_lost + 1, last_lost_at = now(),"
            " reconcile_due = true WHERE slot_name = $1",
            slot,
        )
    if found is not None and found["invalid"]:
        await conn.execute("SELECT pg_drop_replication_slot($1)", slot)
    created = False
    if not usable:
        try:
            await conn.execute("SELECT pg_create_logical_replication_slot($1, $2)", slot, PLUGIN)
        except asyncpg.DuplicateObjectError:
            pass  # another relay (or migrate) made it just now
        else:
            created = True
    if known is None:
        await conn.execute(
            "INSERT INTO spicesync_cdc_slots (slot_name, publication) VALUES ($1, $2)"
            " ON CONFLICT (slot_name) DO NOTHING",
            slot,
            publication,
        )
    row = await conn.fetchrow(
        "SELECT times_lost, reconcile_due FROM spicesync_cdc_slots WHERE slot_name = $1", slot
    )
    assert row is not None
    return SlotState(
        created=created,
        lost=lost,
        reconcile_due=bool(row["reconcile_due"]),
        losses=int(row["times_lost"]),
    )


async def reconcile_done(conn: Conn | asyncpg.Pool, slot: str) -> None:
    """Record that Temporal accepted the reconcile due for the slot's loss."""
    await conn.execute(
        "UPDATE spicesync_cdc_slots SET reconcile_due = false WHERE slot_name = $1", slot
    )


async def peek_changes(conn: Conn, slot: str, publication: str, *, limit: int) -> list[bytes]:
    """The slot's messages past its confirmed position, whole transactions, without consuming.

    Args:
        conn: A connection to the slot's database.
        slot: The slot.
        publication: The publication pgoutput filters by.
        limit: Stop after the transaction that brings the count to this many messages.

    Returns:
        pgoutput messages in commit order (logical decoding messages included: the heartbeat's
        transaction is how an idle slot moves on).
    """
    rows = await conn.fetch(_PEEK, slot, limit, publication)
    return [bytes(r["data"]) for r in rows]


async def heartbeat(conn: Conn | asyncpg.Pool) -> None:
    """Commit a transaction the slot decodes (a logical decoding message, no table written).

    pgoutput sends nothing for transactions of other tables, so a slot whose table is quiet
    would never be confirmed past them and would keep their WAL; the relay confirms past this.
    """
    await conn.execute("SELECT pg_logical_emit_message(true, 'spicesync_cdc_heartbeat', '')")


async def advance_slot(conn: Conn, slot: str, lsn: int) -> None:
    """Move the slot's confirmed position to ``lsn``: WAL before it is no longer kept for it."""
    # asyncpg carries a pg_lsn as an int.
    await conn.execute("SELECT pg_replication_slot_advance($1, $2::pg_lsn)", slot, lsn)


async def lag_bytes(conn: Conn | asyncpg.Pool, slot: str) -> int | None:
    """Bytes of WAL written since the slot's confirmed position; ``None`` without the slot."""
    value = await conn.fetchval(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = $1",
        slot,
    )
    return None if value is None else int(value)
