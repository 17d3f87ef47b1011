"""Follow mode's view of the application's users table: checked once at start, read by id.

The worker looks the table and every mapped column up in PostgreSQL's catalog when it starts
(:func:`inspect_app_table`). A table or column that is missing, or of a type the mapping cannot
use, stops it with one line per problem naming the mapping key, instead of failing every sync
later. What the catalog says is kept in :class:`AppTable`: each sync binds the user id as the id
column's own type, so PostgreSQL can use the column's index, and reads the mapped columns only
(the table's other columns may hold personal data; spicesync never reads them).

spicesync never writes the application's table.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from spicesync.mapping import FollowMapping, MappingError

__all__ = ["FOLLOWED_USERS_TABLE", "AppTable", "AppTableMismatch", "inspect_app_table", "quote"]

# spicesync's bookkeeping of followed users (migration 0005): a user with a row here was synced
# (or failed for good, which a later change retries).
FOLLOWED_USERS_TABLE = "spicesync_followed_users"

# format_type() names of the types each use accepts.
_INTEGERS = frozenset({"smallint", "integer", "bigint"})
_TEXTS = frozenset({"text", "character varying"})
_ID_TYPES = frozenset({"uuid", "bigint", "integer"}) | _TEXTS
_VALUE_TYPES = _ID_TYPES | _INTEGERS | {"boolean"}
_RANGES = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}
_INTEGER_TEXT = re.compile(r"^-?[1-9][0-9]*$|^0$")

_COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, NULL) AS type, t.typtype AS kind
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
"""


class AppTableMismatch(MappingError):
    """The application's table does not have what the mapping names (one line per problem)."""


def quote(identifier: str) -> str:
    """``identifier`` as a quoted SQL identifier (the mapping only admits plain names)."""
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True)
class AppTable:
    """The application's table as the catalog describes it, and the one query a sync runs."""

    mapping: FollowMapping
    # The id column's type, as format_type() names it (one of the id types).
    id_type: str
    # Selects the bookkeeping's marker and the mapped columns of the user's row (if any).
    select: str

    def id_value(self, user_id: str) -> Any:
        """``user_id`` as a value of the id column's type; ``None`` if no row can have it.

        Only the column's own text form counts (a uuid in lower case, an integer in plain
        decimal): that text is the user's subject id in SpiceDB, so another spelling of the
        same value is another (nonexistent) user.
        """
        if self.id_type == "uuid":
            try:
                value = uuid.UUID(user_id)
            except ValueError:
                return None
            return value if str(value) == user_id else None
        if self.id_type in _INTEGERS:
            if not _INTEGER_TEXT.match(user_id):
                return None
            number = int(user_id)
            limit = _RANGES[self.id_type]
            return number if -limit <= number < limit else None
        return user_id

    def row(self, user_id: str, record: asyncpg.Record) -> dict[str, Any] | None:
        """The mapped columns of a fetched record, ``None`` if the user has no row."""
        values = list(record.values())[1:]
        if values[0] is None:
            return None
        row = dict(zip(self.mapping.columns, values, strict=True))
        # The id as the row gives it must be the user id itself (see :meth:`id_value`).
        return row if str(row[self.mapping.source.id]) == user_id else None

    # Reconcile and backfill (docs/follow-mode.md): keyset pages on the id column, and lookups
    # of many users at once; mapped columns only, ids bound as the column's own type.

    @property
    def _id(self) -> str:
        return quote(self.mapping.source.id)

    @property
    def _columns(self) -> str:
        return ", ".join(quote(c) for c in self.mapping.columns)

    async def page(
        self, conn: asyncpg.Connection | asyncpg.Pool, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Rows after ``after`` in id order, each the mapped columns only.

        Args:
            conn: A connection or the pool.
            after: The last id of the previous page (as text); ``None`` for the first page.
            limit: Rows at most.

        Returns:
            Column name to value.
        """
        select = f"SELECT {self._columns} FROM {self.mapping.source.qualified}"
        if after is None:
            records = await conn.fetch(f"{select} ORDER BY {self._id} LIMIT $1", limit)
        else:
            records = await conn.fetch(
                f"{select} WHERE {self._id} > $2::{self.id_type} ORDER BY {self._id} LIMIT $1",
                limit,
                self.id_value(after),
            )
        return [dict(r) for r in records]

    async def rows(
        self, conn: asyncpg.Connection | asyncpg.Pool, user_ids: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """The rows of those of ``user_ids`` that have one, mapped columns only."""
        values = [v for u in user_ids if (v := self.id_value(u)) is not None]
        if not values:
            return {}
        records = await conn.fetch(
            f"SELECT {self._columns} FROM {self.mapping.source.qualified}"
            f" WHERE {self._id} = ANY($1::{self.id_type}[])",
            values,
        )
        return {str(r[self.mapping.source.id]): dict(r) for r in records}

    async def count(self, conn: asyncpg.Connection | asyncpg.Pool) -> int:
        """The table's rows."""
        return int(await conn.fetchval(f"SELECT count(*) FROM {self.mapping.source.qualified}"))

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
        """
        base = f"SELECT t.{self._id} AS id FROM {self.mapping.source.qualified} t"
        if after is None:
            page = f"{base} ORDER BY t.{self._id} LIMIT $1"
            args: tuple[Any, ...] = (limit,)
        else:
            page = f"{base} WHERE t.{self._id} > $2::{self.id_type} ORDER BY t.{self._id} LIMIT $1"
            args = (limit, self.id_value(after))
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


def _uses(mapping: FollowMapping) -> list[tuple[str, str, frozenset[str], str]]:
    """(mapping key, column, accepted types, what they are called) for every column used."""
    source = mapping.source
    uses = [("source.id", source.id, _ID_TYPES, "uuid, text, varchar, bigint or integer")]
    if source.version:
        uses.append(("source.version", source.version, _INTEGERS, "an integer type"))
    value = "uuid, text, varchar, an integer type, boolean or an enum"
    for index, rule in enumerate(mapping.rules):
        where = f"relationships[{index}]"
        for column in re.findall(r"\{([^{}]*)\}", rule.resource):
            uses.append((f"{where}.resource", column, _VALUE_TYPES | {"enum"}, value))
        if rule.relation_column:
            uses.append(
                (f"{where}.relation", rule.relation_column, _TEXTS | {"enum"}, "text or an enum")
            )
        for key in ("when", "unless"):
            column = getattr(rule, key)
            if column:
                uses.append((f"{where}.{key}", column, frozenset({"boolean"}), "boolean"))
    return uses


async def inspect_app_table(
    conn: asyncpg.Connection | asyncpg.Pool, mapping: FollowMapping
) -> AppTable:
    """Check the application's table against the mapping and prepare the sync's query.

    Args:
        conn: A connection (or the pool) to the application's database.
        mapping: The validated mapping.

    Returns:
        The table as the syncs read it.

    Raises:
        AppTableMismatch: The table is missing or not readable, or a column is missing or of an
            unusable type; one line per problem, each naming the mapping key.
    """
    origin, source = mapping.origin, mapping.source
    table = source.qualified
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", table)
    if oid is None:
        raise AppTableMismatch(
            f"{origin}: source.table: table {source.table} does not exist"
            " (or is not visible to this database user)"
        )
    if not await conn.fetchval("SELECT has_table_privilege($1::oid, 'SELECT')", oid):
        raise AppTableMismatch(
            f"{origin}: source.table: this database user may not SELECT from {source.table}"
        )
    columns = {r["name"]: r for r in await conn.fetch(_COLUMNS, oid)}
    problems = []
    for key, column, accepted, described in _uses(mapping):
        found = columns.get(column)
        if found is None:
            problems.append(f"{origin}: {key}: column {column} does not exist in {source.table}")
            continue
        kind = "enum" if found["kind"] == b"e" else found["type"]
        if kind not in accepted:
            problems.append(
                f"{origin}: {key}: column {column} is {found['type']}; it must be {described}"
            )
    if problems:
        raise AppTableMismatch("\n".join(dict.fromkeys(problems)))
    id_type = columns[source.id]["type"]
    selected = ", ".join(f"t.{quote(c)}" for c in mapping.columns)
    # One round trip: the bookkeeping's marker (kept monotone across a SpiceDB that lost its
    # data) and the row; the id is bound as the column's own type, so its index serves.
    select = (
        f"SELECT f.marker, {selected} FROM (SELECT 1) AS one"
        f" LEFT JOIN {table} AS t ON t.{quote(source.id)} = $1::{id_type}"
        " LEFT JOIN spicesync_followed_users AS f ON f.user_id = $2"
    )
    return AppTable(mapping=mapping, id_type=id_type, select=select)
