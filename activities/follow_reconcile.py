"""Steps of the reconcile workflow in follow mode: the application's table through the mapping.

The same two passes as owned mode (``activities/reconcile.py``), over what the mapping manages:

1. the application's table by keyset on its id column, mapped columns only: one
   CheckBulkPermissions per page asks whether each user holds what the row implies (when the
   schema lets a check prove a relationship exists; otherwise each user's relationships are
   read), and only the users who lack something are read in full and classified (``missing``,
   ``unsynced``, ``extra``), beside the ``unmappable`` rows;
2. SpiceDB's relationships, per managed resource type with the mapping's subject type, with
   SpiceDB's own cursor: subjects without a row are ``orphan`` users, and users who hold more
   than their row implies while lacking nothing are ``extra``.

Each drifted user is found by exactly one pass, so it is counted once.

Only the mapping's managed (type, relation) pairs are judged: an application's own relation on
the same objects (an organization's ``owner``, say) is never read as drift. Repairs are not
written here: each drifted user's own workflow gets a change (source ``reconcile``) and syncs
level-triggered, in turn with the user's live changes.
"""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import grpc.aio
from authzed.api.v1 import (
    Consistency,
    Cursor,
    ReadRelationshipsRequest,
    ReadSchemaRequest,
    RelationshipFilter,
    SubjectFilter,
)
from temporalio import activity
from temporalio.client import Client

from activities.drift import classify_followed
from activities.reconcile import require_schema, save_report_row
from spicesync.app_table import FOLLOWED_USERS_TABLE, AppTable
from spicesync.client import deliver_change
from spicesync.errors import (
    AppDBUnavailable,
    InvalidUserInput,
    SpiceDBUnavailable,
)
from spicesync.mapping import Tuple, UnmappableRow, valid_user_id
from spicesync.models import (
    CheckSchemaInput,
    DeliverRepairsInput,
    Drift,
    RepairUsersResult,
    SaveReportInput,
    ScanFollowedRelationshipsInput,
    ScanFollowedRowsInput,
    ScanPageResult,
    UserChangedInput,
)
from spicesync.spicedb import (
    SpiceDBClient,
    holds_relationships,
    managed_tuple,
    read_managed,
    relations_direct_only,
)

__all__ = ["FollowReconcileActivities", "deliver_changes"]

# Reads of a page's users, and deliveries, run this many at a time.
_CONCURRENCY = 16
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
_SYNCED = f"SELECT user_id FROM {FOLLOWED_USERS_TABLE} WHERE user_id = ANY($1::text[])"


async def deliver_changes(
    client: Client, task_queue: str, user_ids: list[str], source: str
) -> tuple[int, list[str]]:
    """Deliver a change to each user's workflow (signal-with-start), a few at a time.

    A delivery is durable once Temporal answers; no worker has to pick it up first. Delivering
    again is harmless (the user's workflow reads the row as it is), so a retried activity may.

    Args:
        client: The worker's Temporal client.
        task_queue: The workers' task queue.
        user_ids: The users.
        source: Who delivers (``reconcile``, ``backfill``), recorded in the change.

    Returns:
        How many were delivered, and ``<id>:<error type>`` for each that cannot be (an id no
        workflow can have).

    Raises:
        RPCError: Temporal refused a call; the activity is retried.
    """
    gate = asyncio.Semaphore(_CONCURRENCY)
    refused: list[str] = []
    delivered = 0

    async def deliver(user_id: str) -> None:
        nonlocal delivered
        async with gate:
            try:
                await deliver_change(
                    UserChangedInput(user_id=user_id, source=source),
                    client=client,
                    task_queue=task_queue,
                )
            except InvalidUserInput:
                refused.append(f"{user_id}:{InvalidUserInput.__name__}")
            else:
                delivered += 1
            activity.heartbeat(delivered)

    await asyncio.gather(*(deliver(u) for u in user_ids))
    return delivered, refused


def _position(cursor: str | None, types: tuple[str, ...]) -> tuple[str, str] | None:
    """(resource type, SpiceDB cursor) a scan cursor stands for; ``None``: past the last type.

    A cursor names its type, so a mapping that changed between pages resumes at the next type.
    """
    if cursor is None:
        return (types[0], "") if types else None
    resource_type, _, token = cursor.partition(":")
    if resource_type in types:
        return resource_type, token
    later = [t for t in types if t > resource_type]
    return (later[0], "") if later else None


class FollowReconcileActivities:
    """The reconcile workflow's follow-mode activities; they share the worker's pool and clients."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        spicedb: SpiceDBClient,
        client: Client,
        task_queue: str,
        table: AppTable,
    ) -> None:
        self._pool = pool
        self._spicedb = spicedb
        self._client = client
        self._task_queue = task_queue
        self._mapping = table.mapping
        self._table = table

    @activity.defn
    async def check_follow_schema(self, _request: CheckSchemaInput) -> None:
        """Refuse to scan against a schema that lacks a managed type or relation.

        Raises:
            SchemaMismatch: Something is missing; every user would look drifted.
            SpiceDBUnavailable: SpiceDB could not be asked; retried.
        """
        await require_schema(
            self._spicedb,
            self._mapping.required_schema(),
            f"add them to the schema, or change {self._mapping.origin}",
        )

    async def _held(self, user_ids: list[str]) -> dict[str, frozenset[Tuple]]:
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def read(user_id: str) -> frozenset[Tuple]:
            async with gate:
                state = await read_managed(
                    self._spicedb,
                    user_id=user_id,
                    subject_type=self._mapping.subject_type,
                    managed=self._mapping.managed,
                )
            activity.heartbeat()
            return state.relationships

        try:
            found = await asyncio.gather(*(read(u) for u in user_ids))
        except grpc.aio.AioRpcError as err:
            raise SpiceDBUnavailable(f"SpiceDB {err.code().name} during the scan") from None
        return dict(zip(user_ids, found, strict=True))

    async def _direct_only(self) -> bool:
        """Whether a check of every managed relation proves the relationship itself exists."""
        try:
            schema = await self._spicedb.ReadSchema(ReadSchemaRequest(), timeout=5)
        except grpc.aio.AioRpcError as err:
            raise SpiceDBUnavailable(f"SpiceDB {err.code().name} reading the schema") from None
        return relations_direct_only(schema.schema_text, self._mapping.managed)

    async def _lacking(self, implied: dict[str, frozenset[Tuple]]) -> list[str]:
        """The users who lack at least one relationship their row implies.

        One CheckBulkPermissions per page when the schema lets a check stand for the
        relationship itself; otherwise (a managed relation reachable through a subject set or a
        wildcard) each user's relationships are read.
        """
        if not await self._direct_only():
            held = await self._held(list(implied))
            return [u for u, relationships in implied.items() if not relationships <= held[u]]
        items = [(u, r) for u, relationships in implied.items() for r in sorted(relationships)]
        try:
            holds = await holds_relationships(self._spicedb, [r for _, r in items])
        except grpc.aio.AioRpcError as err:
            raise SpiceDBUnavailable(f"SpiceDB {err.code().name} during the scan") from None
        return list(dict.fromkeys(u for (u, _), ok in zip(items, holds, strict=True) if not ok))

    @activity.defn
    async def scan_followed_rows(self, request: ScanFollowedRowsInput) -> ScanPageResult:
        """Check one keyset page of the application's table against SpiceDB.

        Finds the users who lack a relationship their row implies (``missing``, ``unsynced``,
        or ``extra`` when they also hold others) and the ``unmappable`` rows; a user who lacks
        nothing but holds more is found by the SpiceDB pass.

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
            SpiceDBUnavailable: SpiceDB failed; retried.
        """
        id_column = self._mapping.source.id
        try:
            rows = await self._table.page(self._pool, request.after_user_id, request.page_size)
            ids = [str(row[id_column]) for row in rows]
            synced = {r["user_id"] for r in await self._pool.fetch(_SYNCED, ids)}
        except _DB_ERRORS as err:
            raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None
        activity.heartbeat()
        drift: list[Drift] = []
        implied: dict[str, frozenset[Tuple]] = {}
        unusable = 0
        for user_id, row in zip(ids, rows, strict=True):
            if not valid_user_id(user_id):
                unusable += 1  # no workflow, no subject id: never named (it may not be opaque)
                continue
            try:
                implied[user_id] = self._mapping.relationships(user_id, row)
            except UnmappableRow:
                drift.append(Drift(user_id=user_id, kind="unmappable"))
        lacking = await self._lacking(implied)
        held = await self._held(lacking)
        for user_id in lacking:
            is_synced = user_id in synced
            found = classify_followed(user_id, implied[user_id], held[user_id], synced=is_synced)
            if found is not None:
                drift.append(found)
        return ScanPageResult(
            drift=drift,
            scanned=len(rows),
            unusable_ids=unusable,
            next=ids[-1] if len(rows) == request.page_size else None,
        )

    @activity.defn
    async def scan_followed_relationships(
        self, request: ScanFollowedRelationshipsInput
    ) -> ScanPageResult:
        """Check one page of SpiceDB's managed relationships against the application's table.

        Pages walk the managed resource types in order, each with SpiceDB's cursor, reading only
        relationships whose subject is of the mapping's subject type. Finds ``orphan`` users (no
        row) and users who hold relationships their row does not imply while lacking none
        (``extra``; the users who lack some are the table pass's).

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
            SpiceDBUnavailable: SpiceDB failed; retried.
        """
        types = self._mapping.managed_resource_types
        position = _position(request.cursor, types)
        if position is None:
            return ScanPageResult(drift=[], scanned=0, next=None)
        resource_type, token = position
        seen: dict[str, set[Tuple]] = {}
        count = 0
        try:
            async for item in self._spicedb.ReadRelationships(
                ReadRelationshipsRequest(
                    consistency=Consistency(fully_consistent=True),
                    relationship_filter=RelationshipFilter(
                        resource_type=resource_type,
                        optional_subject_filter=SubjectFilter(
                            subject_type=self._mapping.subject_type
                        ),
                    ),
                    optional_limit=request.page_size,
                    optional_cursor=Cursor(token=token) if token else None,
                ),
                timeout=60,
            ):
                count += 1
                token = item.after_result_cursor.token
                # The application's own relations are not spicesync's to judge.
                tuple_ = managed_tuple(
                    item.relationship,
                    subject_type=self._mapping.subject_type,
                    managed=self._mapping.managed,
                )
                if tuple_ is not None:
                    seen.setdefault(tuple_.subject_id, set()).add(tuple_)
        except grpc.aio.AioRpcError as err:
            raise SpiceDBUnavailable(f"SpiceDB {err.code().name} during the scan") from None
        activity.heartbeat()
        try:
            rows = await self._table.rows(self._pool, seen)
        except _DB_ERRORS as err:
            raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None
        implied: dict[str, frozenset[Tuple] | None] = {}
        for user_id, tuples in seen.items():
            row = rows.get(user_id)
            try:
                implied_now = self._mapping.relationships(user_id, row)
            except UnmappableRow:
                continue  # the table pass reports it
            if row is None or not tuples <= implied_now:
                implied[user_id] = implied_now if row is not None else None
        # Read in full: an orphan's relationships may reach past this page (the prune cap
        # weighs them all), and a user with a row may also lack some (then it is the table
        # pass's).
        held = await self._held(sorted(implied))
        drift: list[Drift] = []
        for user_id, relationships in sorted(implied.items()):
            if relationships is not None and not relationships <= held[user_id]:
                continue
            found = classify_followed(user_id, relationships, held[user_id], synced=True)
            if found is not None:
                drift.append(found)
        if count == request.page_size:
            next_cursor: str | None = f"{resource_type}:{token}"
        else:
            later = types[types.index(resource_type) + 1 :]
            next_cursor = f"{later[0]}:" if later else None
        return ScanPageResult(drift=drift, scanned=count, next=next_cursor)

    @activity.defn
    async def deliver_repairs(self, request: DeliverRepairsInput) -> RepairUsersResult:
        """Deliver a change (source ``reconcile``) to each drifted user's workflow.

        The change carries no version, so the user's workflow syncs whatever it last applied:
        a drift is by definition something no newer row version announced.

        Raises:
            RPCError: Temporal refused a delivery; retried (delivering twice is harmless).
        """
        delivered, refused = await deliver_changes(
            self._client, self._task_queue, request.user_ids, "reconcile"
        )
        return RepairUsersResult(
            delivered=delivered, failed=len(refused), failed_samples=refused[:10]
        )

    @activity.defn
    async def save_follow_report(self, request: SaveReportInput) -> None:
        """Keep the run's report in ``spicesync_reconcile_reports`` (idempotent per run).

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
        """
        await save_report_row(self._pool, "spicesync_reconcile_reports", request)
