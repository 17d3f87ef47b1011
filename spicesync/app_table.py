"""The application's users table in follow mode, read through the mapping and never written.

Only the columns the mapping names are selected: the others may hold PII. The id column may be
uuid, text or an integer, while ids travel as text (workflow ids, SpiceDB subject ids, cursors);
each text id is turned back into the column's type here, and a text that no row's id prints as
(``"007"`` for an integer, an upper-case UUID) matches no row, exactly as a SpiceDB subject id
made from that row would not.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from spicesync.mapping import FollowMapping

__all__ = ["FOLLOWED_USERS_TABLE", "AppTable", "AppTableMismatch", "id_parser"]

# spicesync's bookkeeping of followed users (migration 0005): a user with a row here was synced.
FOLLOWED_USERS_TABLE = "spicesync_followed_users"

_ID_TYPE = """
SELECT atttypid::regtype::text FROM pg_attribute
WHERE attrelid = $1::text::regclass AND attname = $2 AND attnum > 0 AND NOT attisdropped
"""
_INTEGER_BITS = {"smallint": 16, "integer": 32, "bigint": 64}
_TEXT_TYPES = frozenset({"text", "character varying"})
_INTEGER = re.compile(r"^-?[0-9]{1,20}$")


class AppTableMismatch(Exception):
    """The application's table does not have the id column the mapping names, of a usable type."""


def _integer(bits: int) -> Callable[[str], int | None]:
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def parse(text: str) -> int | None:
        if not _INTEGER.match(text):
            return None
        value = int(text)
        return value if str(value) == text and low <= value <= high else None

    return parse


def _uuid(text: str) -> uuid.UUID | None:
    try:
        value = uuid.UUID(text)
    except ValueError:
        return None
    return value if str(value) == text else None


def _text(text: str) -> str:
    return text


def id_parser(sql_type: str) -> Callable[[str], Any]:
    """How a text id becomes a value of the id column's type (``None``: no row can have it).

    Args:
        sql_type: The column's type as PostgreSQL names it (``bigint``, ``uuid``, ``text``, ...).

    Returns:
        A function from the id as text to the column's value, or ``None``.

    Raises:
        AppTableMismatch: Not a type a user id can have (uuid, text or an integer).
    """
    if sql_type in _INTEGER_BITS:
        return _integer(_INTEGER_BITS[sql_type])
    if sql_type == "uuid":
        return _uuid
    if sql_type in _TEXT_TYPES:
        return _text
    raise AppTableMismatch(
        f"the id column is of type {sql_type}; follow mode needs uuid, text or an integer"
    )


@dataclass(frozen=True)
class AppTable:
    """Keyset pages and lookups of the application's table, as the mapping describes it."""

    mapping: FollowMapping

    @property
    def _id(self) -> str:
        return f'"{self.mapping.source.id}"'

    @property
    def _columns(self) -> str:
        return ", ".join(f'"{c}"' for c in self.mapping.columns)

    @property
    def _table(self) -> str:
        return self.mapping.source.qualified

    async def _parser(self, conn: asyncpg.Connection | asyncpg.Pool) -> Callable[[str], Any]:
        source = self.mapping.source
        sql_type = await conn.fetchval(_ID_TYPE, self._table, source.id)
        if sql_type is None:
            raise AppTableMismatch(f"{source.table} has no column {source.id} (the mapping's id)")
        return id_parser(str(sql_type))

    async def page(
        self, conn: asyncpg.Connection | asyncpg.Pool, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Rows after ``after`` in id order, each the mapped columns only.

        Args:
            conn: A connection or the pool.
            after: The last id of the previous page (as text); ``None`` for the first page.
            limit: Rows at most.

        Returns:
            Column name to value, the id column first.

        Raises:
            AppTableMismatch: The id column is missing or of an unusable type.
        """
        select = f"SELECT {self._columns} FROM {self._table}"
        if after is None:
            records = await conn.fetch(f"{select} ORDER BY {self._id} LIMIT $1", limit)
        else:
            start = (await self._parser(conn))(after)
            records = await conn.fetch(
                f"{select} WHERE {self._id} > $2 ORDER BY {self._id} LIMIT $1", limit, start
            )
        return [dict(r) for r in records]

    async def rows(
        self, conn: asyncpg.Connection | asyncpg.Pool, ids: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """The rows of those of ``ids`` (as text) that have one, mapped columns only.

        Raises:
            AppTableMismatch: The id column is missing or of an unusable type.
        """
        parse = await self._parser(conn)
        values = [v for i in ids if (v := parse(i)) is not None]
        if not values:
            return {}
        records = await conn.fetch(
            f"SELECT {self._columns} FROM {self._table} WHERE {self._id} = ANY($1)", values
        )
        return {str(r[self.mapping.source.id]): dict(r) for r in records}

    async def count(self, conn: asyncpg.Connection | asyncpg.Pool) -> int:
        """The table's rows."""
        return int(await conn.fetchval(f"SELECT count(*) FROM {self._table}"))

    async def never_synced_page(
        self, conn: asyncpg.Connection | asyncpg.Pool, after: str | None, limit: int
    ) -> tuple[list[str], int, str | None]:
        """One keyset page of ids, and which of them spicesync has never synced.

        Args:
            conn: A connection or the pool.
            after: The last id of the previous page (as text); ``None`` for the first page.
            limit: Rows at most.

        Returns:
            The never-synced ids (as text, in id order), the rows on the page, and the page's
            last id (``None`` when the page is empty).

        Raises:
            AppTableMismatch: The id column is missing or of an unusable type.
        """
        base = f"SELECT t.{self._id} AS id FROM {self._table} t"
        if after is None:
            page = f"{base} ORDER BY t.{self._id} LIMIT $1"
            args: tuple[Any, ...] = (limit,)
        else:
            page = f"{base} WHERE t.{self._id} > $2 ORDER BY t.{self._id} LIMIT $1"
            args = (limit, (await self._parser(conn))(after))
        # A user with a bookkeeping row has been synced (or failed for good, which a later
        # change retries): only the others are the backfill's.
        records = await conn.fetch(
            f"""
            WITH page AS ({page})
            SELECT page.id::text AS id,
                   NOT EXISTS (
                       SELECT 1 FROM {FOLLOWED_USERS_TABLE} f WHERE f.user_id = page.id::text
                   ) AS never_synced
            FROM page ORDER BY page.id
            """,
            *args,
        )
        ids = [r["id"] for r in records if r["never_synced"]]
        return ids, len(records), records[-1]["id"] if records else None
