"""Steps of the reconcile workflow: check the schema, scan both stores a page at a time, repair.

Scanning is two passes over keyset pages. The App DB pass walks ``users`` by id and asks SpiceDB,
in one CheckBulkPermissions call per page, whether each user holds the role the row gives; only
the users that do not are read in full and classified. The SpiceDB pass walks the organization
relationships with SpiceDB's own cursor and looks each page's users up in the App DB, which finds
what the first pass cannot see: relationships of users the App DB does not have.

Repairs are not written here: each drifted user's own workflow rewrites that user (the
``reconcile`` update), in turn with the user's live events.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import grpc
import grpc.aio
from authzed.api.v1 import (
    Consistency,
    Cursor,
    DeleteRelationshipsRequest,
    ReadRelationshipsRequest,
    RelationshipFilter,
    SubjectFilter,
)
from temporalio import activity
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from activities.drift import IN_FLIGHT, AppRow, classify
from spicesync.constants import SPICEDB_CALL_TIMEOUT_SECONDS, user_workflow_id
from spicesync.errors import AppDBUnavailable, SchemaMismatch, SpiceDBUnavailable
from spicesync.models import (
    CheckSchemaInput,
    Drift,
    Membership,
    MembershipsSnapshot,
    ReconcileUserInput,
    ReconcileUserResult,
    RepairUsersInput,
    RepairUsersResult,
    SaveReportInput,
    ScanAppDBPageInput,
    ScanPageResult,
    ScanSpiceDBPageInput,
    UserSyncInput,
)
from spicesync.spicedb import (
    MANAGED_RELATIONS,
    REQUIRED_RELATIONS,
    SpiceDBClient,
    check_schema,
    holds_memberships,
    read_user_snapshot,
)
from spicesync.temporal import execute_update_with_start, sync_is_active
from workflows.user_sync import UserSyncWorkflow

__all__ = ["ReconcileActivities", "require_schema", "save_report_row"]

# ``overdue``: a creation's pending row older than the grace the reconcile gives it.
_COLUMNS = """
SELECT id, org_id, role, version,
       (sync_status = 'pending' AND created_by_event IS NOT NULL) AS creating,
       (sync_status = 'pending' AND created_by_event IS NOT NULL
        AND created_at < now() - make_interval(secs => $1)) AS overdue,
       (permissions_written_at IS NULL AND created_by_event IS NULL) AS never_synced
FROM users
"""
_PAGE = _COLUMNS + "WHERE $2::uuid IS NULL OR id > $2 ORDER BY id LIMIT $3"
_ROWS = _COLUMNS + "WHERE id = ANY($2::uuid[])"
# Reads of a page's suspicious users, and repairs, run this many at a time.
_CONCURRENCY = 16
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _uuid_or_none(value: str) -> uuid.UUID | None:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return parsed if str(parsed) == value else None


def _app_row(record: asyncpg.Record, active: set[str]) -> AppRow:
    user_id = str(record["id"])
    return AppRow(
        user_id=user_id,
        org_id=record["org_id"],
        role=record["role"],
        version=record["version"],
        creating=record["creating"],
        unfinished=record["overdue"] and user_id not in active,
        never_synced=record["never_synced"],
    )


def _classify_all(
    rows: list[AppRow], snapshots: dict[str, MembershipsSnapshot]
) -> tuple[list[Drift], int]:
    """Drift among ``rows``, and how many were left alone because a live sync is mid-way."""
    drift: list[Drift] = []
    in_flight = 0
    for row in rows:
        found = classify(row, snapshots[row.user_id])
        if found == IN_FLIGHT:
            in_flight += 1
        elif isinstance(found, Drift):
            drift.append(found)
    return drift, in_flight


class ReconcileActivities:
    """The reconcile workflow's activities; they share the worker's pool and clients."""

    def __init__(
        self, pool: asyncpg.Pool, spicedb: SpiceDBClient, client: Client, task_queue: str
    ) -> None:
        self._pool = pool
        self._spicedb = spicedb
        self._client = client
        self._task_queue = task_queue

    @activity.defn
    async def check_schema_ready(self, _request: CheckSchemaInput) -> None:
        """Refuse to scan against a schema that lacks what spicesync writes.

        Raises:
            SchemaMismatch: Something is missing; every user would look drifted.
            SpiceDBUnavailable: SpiceDB could not be asked; retried.
        """
        await require_schema(self._spicedb, REQUIRED_RELATIONS, "write spicesync's schema.zed")

    async def _rows(self, records: list[asyncpg.Record]) -> list[AppRow]:
        """The App DB rows, each overdue creation judged by whether its user's sync is active.

        An overdue creation whose workflow is working on a store (retrying through an outage,
        parked) is a live sync that ``spicesync stuck`` reports; one whose workflow is idle,
        closed or absent has nothing in flight that will ever finish it.
        """
        overdue = [str(r["id"]) for r in records if r["overdue"]]
        active = await asyncio.gather(*(sync_is_active(self._client, u) for u in overdue))
        busy = {u for u, is_active in zip(overdue, active, strict=True) if is_active}
        return [_app_row(r, busy) for r in records]

    async def _snapshots(self, user_ids: list[str]) -> dict[str, MembershipsSnapshot]:
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def read(user_id: str) -> MembershipsSnapshot:
            async with gate:
                snapshot = await read_user_snapshot(self._spicedb, user_id)
            activity.heartbeat()
            return snapshot

        snapshots = await asyncio.gather(*(read(u) for u in user_ids))
        return dict(zip(user_ids, snapshots, strict=True))

    @activity.defn
    async def scan_app_db_page(self, request: ScanAppDBPageInput) -> ScanPageResult:
        """Check one keyset page of App DB users against SpiceDB.

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
            SpiceDBUnavailable: SpiceDB failed; retried.
        """
        after = uuid.UUID(request.after_user_id) if request.after_user_id else None
        try:
            records = await self._pool.fetch(
                _PAGE, request.unfinished_after_seconds, after, request.page_size
            )
        except _DB_ERRORS as err:
            raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None
        activity.heartbeat()
        rows = await self._rows(records)
        unfinished = [r for r in rows if r.unfinished]
        checkable = [r for r in rows if not r.creating]
        try:
            holds = await holds_memberships(
                self._spicedb,
                [Membership(user_id=r.user_id, org_id=r.org_id, role=r.role) for r in checkable],
            )
            # Holding the role is not enough to be right (an extra membership may remain), but
            # an extra membership is found by the SpiceDB pass; here only the lacking are read.
            lacking = [r for r, ok in zip(checkable, holds, strict=True) if not ok]
            snapshots = await self._snapshots([r.user_id for r in [*lacking, *unfinished]])
        except grpc.aio.AioRpcError as err:
            raise SpiceDBUnavailable(f"SpiceDB {err.code().name} during the scan") from None
        drift, in_flight = _classify_all([*lacking, *unfinished], snapshots)
        in_flight += len(rows) - len(checkable) - len(unfinished)
        activity.heartbeat()
        return ScanPageResult(
            drift=drift,
            scanned=len(rows),
            in_flight=in_flight,
            next=rows[-1].user_id if len(rows) == request.page_size else None,
        )

    @activity.defn
    async def scan_spicedb_page(self, request: ScanSpiceDBPageInput) -> ScanPageResult:
        """Check one page of SpiceDB's organization relationships against the App DB.

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
            SpiceDBUnavailable: SpiceDB failed; retried.
        """
        held: dict[str, list[Membership]] = {}
        cursor: str | None = None
        count = 0
        try:
            async for item in self._spicedb.ReadRelationships(
                ReadRelationshipsRequest(
                    consistency=Consistency(fully_consistent=True),
                    relationship_filter=RelationshipFilter(
                        resource_type="organization",
                        optional_subject_filter=SubjectFilter(subject_type="user"),
                    ),
                    optional_limit=request.page_size,
                    optional_cursor=Cursor(token=request.cursor) if request.cursor else None,
                ),
                timeout=60,
            ):
                rel = item.relationship
                cursor = item.after_result_cursor.token
                count += 1
                if rel.relation not in MANAGED_RELATIONS:
                    continue  # the app's own relation, not spicesync's to judge
                user_id = rel.subject.object.object_id
                held.setdefault(user_id, []).append(
                    Membership(user_id=user_id, org_id=rel.resource.object_id, role=rel.relation)
                )
        except grpc.aio.AioRpcError as err:
            raise SpiceDBUnavailable(f"SpiceDB {err.code().name} during the scan") from None
        activity.heartbeat()
        ids = {u: parsed for u in held if (parsed := _uuid_or_none(u)) is not None}
        try:
            records = await self._pool.fetch(
                _ROWS, request.unfinished_after_seconds, list(ids.values())
            )
        except _DB_ERRORS as err:
            raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None
        rows = {row.user_id: row for row in await self._rows(records)}
        drift: list[Drift] = []
        suspicious: list[AppRow] = []
        for user_id, memberships in held.items():
            row = rows.get(user_id)
            if row is None:
                drift.append(Drift(user_id=user_id, kind="orphan", deletions=len(memberships)))
            elif row.unfinished or any(
                m != Membership(user_id=user_id, org_id=row.org_id, role=row.role)
                for m in memberships
            ):
                suspicious.append(row)
        try:
            snapshots = await self._snapshots([r.user_id for r in suspicious])
        except grpc.aio.AioRpcError as err:
            raise SpiceDBUnavailable(f"SpiceDB {err.code().name} during the scan") from None
        found, in_flight = _classify_all(suspicious, snapshots)
        drift.extend(found)
        activity.heartbeat()
        return ScanPageResult(
            drift=drift,
            scanned=count,
            in_flight=in_flight,
            next=cursor if count == request.page_size else None,
        )

    @activity.defn
    async def repair_users(self, request: RepairUsersInput) -> RepairUsersResult:
        """Ask each user's own workflow to make SpiceDB match the App DB for that user.

        Users whose id is not a UUID cannot have a workflow (no event could create them); their
        relationships are deleted here directly, since no live sync can ever race them.

        Raises:
            SpiceDBUnavailable: A direct deletion failed transiently; retried.
        """
        gate = asyncio.Semaphore(_CONCURRENCY)
        results: list[ReconcileUserResult] = []

        async def repair(user_id: str) -> None:
            async with gate:
                if _uuid_or_none(user_id) is None:
                    results.append(await self._delete_foreign(user_id))
                else:
                    results.append(await self._repair_through_workflow(request, user_id))
                activity.heartbeat(len(results))

        await asyncio.gather(*(repair(u) for u in request.user_ids))
        failed = [
            f"{u}:{r.error_type}"
            for u, r in zip(request.user_ids, results, strict=True)
            if r.action == "failed"
        ]
        return RepairUsersResult(
            repaired=sum(r.action == "repaired" for r in results),
            removed_unfinished=sum(r.action == "removed_unfinished" for r in results),
            consistent=sum(r.action == "consistent" for r in results),
            failed=len(failed),
            relationships_written=sum(r.removed + r.added for r in results),
            failed_samples=failed[:10],
        )

    async def _repair_through_workflow(
        self, request: RepairUsersInput, user_id: str
    ) -> ReconcileUserResult:
        return await execute_update_with_start(
            self._client,
            UserSyncWorkflow.reconcile,
            ReconcileUserInput(request_id=request.request_id),
            start_workflow_operation=WithStartWorkflowOperation(
                UserSyncWorkflow.run,
                UserSyncInput(user_id=user_id),
                id=user_workflow_id(user_id),
                task_queue=self._task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            ),
        )

    async def _delete_foreign(self, user_id: str) -> ReconcileUserResult:
        removed = 0
        token = None
        for relation in sorted(MANAGED_RELATIONS):
            try:
                response = await self._spicedb.DeleteRelationships(
                    DeleteRelationshipsRequest(
                        relationship_filter=RelationshipFilter(
                            resource_type="organization",
                            optional_relation=relation,
                            optional_subject_filter=SubjectFilter(
                                subject_type="user", optional_subject_id=user_id
                            ),
                        )
                    ),
                    timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
                )
            except grpc.aio.AioRpcError as err:
                raise SpiceDBUnavailable(f"SpiceDB {err.code().name} deleting an orphan") from None
            removed += int(response.relationships_deleted_count)
            token = response.deleted_at.token
        return ReconcileUserResult(
            action="repaired" if removed else "consistent", removed=removed, zed_token=token
        )

    @activity.defn
    async def save_report(self, request: SaveReportInput) -> None:
        """Keep the run's report in ``reconcile_reports`` (idempotent on workflow and run id).

        Raises:
            AppDBUnavailable: PostgreSQL failed; retried.
        """
        await save_report_row(self._pool, "reconcile_reports", request)


async def require_schema(
    spicedb: SpiceDBClient, required: tuple[tuple[str, str, str], ...], fix: str
) -> None:
    """Refuse to scan against a schema that lacks what spicesync writes.

    Args:
        spicedb: The SpiceDB client.
        required: (definition, relation, subject type) that must be defined.
        fix: What the operator should do, for the message.

    Raises:
        SchemaMismatch: Something is missing; every user would look drifted.
        SpiceDBUnavailable: SpiceDB could not be asked; retried.
    """
    try:
        missing = await check_schema(spicedb, required)
    except grpc.aio.AioRpcError as err:
        raise SpiceDBUnavailable(f"SpiceDB {err.code().name} reading the schema") from None
    if missing:
        raise SchemaMismatch("SpiceDB's schema lacks " + "; ".join(missing) + f" ({fix})")


async def save_report_row(pool: asyncpg.Pool, table: str, request: SaveReportInput) -> None:
    """Keep a run's report in ``table`` (idempotent on workflow and run id).

    Args:
        pool: The App DB's pool.
        table: ``reconcile_reports`` (owned mode) or ``spicesync_reconcile_reports`` (follow).
        request: The run's ids and its report (counts and opaque ids only).

    Raises:
        AppDBUnavailable: PostgreSQL failed; retried.
    """
    try:
        await pool.execute(
            f"""
            INSERT INTO {table} (workflow_id, run_id, dry_run, report)
            VALUES ($1, $2, $3, $4::jsonb)
            ON CONFLICT (workflow_id, run_id) DO NOTHING
            """,
            request.workflow_id,
            request.run_id,
            request.report.dry_run,
            json.dumps(request.report.model_dump(mode="json")),
        )
    except _DB_ERRORS as err:
        raise AppDBUnavailable(f"PostgreSQL unavailable: {type(err).__name__}") from None
