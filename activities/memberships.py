"""SpiceDB steps of the saga: read a user's memberships, and rewrite them in one atomic call.

Every write moves the user's version marker (``user:<id>#sync_version@spicesync_version:<v>``)
under a precondition on the marker it expects, so writes are compare-and-set: a write from an
attempt that was given up on can never land after a newer one.
"""

from __future__ import annotations

import grpc
import grpc.aio
from authzed.api.v1 import (
    Consistency,
    ObjectReference,
    Precondition,
    ReadRelationshipsRequest,
    Relationship,
    RelationshipFilter,
    RelationshipUpdate,
    SubjectFilter,
    SubjectReference,
    WriteRelationshipsRequest,
)
from google.protobuf.struct_pb2 import Struct
from temporalio import activity

from spicesync.constants import SPICEDB_CALL_TIMEOUT_SECONDS
from spicesync.errors import SchemaMismatch, SpiceDBRejected, SpiceDBUnavailable, SupersededWrite
from spicesync.failures import FailureKind, classify_grpc_status
from spicesync.models import (
    Membership,
    MembershipsSnapshot,
    ReadMembershipsInput,
    WriteMembershipsInput,
    WriteMembershipsResult,
)
from spicesync.spicedb import SpiceDBClient, membership_relationship

__all__ = ["MembershipActivities"]

_MARKER_RELATION = "sync_version"
_MARKER_TYPE = "spicesync_version"
_PRECONDITION_FAILED = "unable to satisfy write precondition"
# A failed precondition and a schema mismatch share FAILED_PRECONDITION; the text tells them apart.
_SCHEMA_MISMATCH = "not found under definition"

_TOUCH = RelationshipUpdate.Operation.OPERATION_TOUCH
_DELETE = RelationshipUpdate.Operation.OPERATION_DELETE


def _translate(err: grpc.aio.AioRpcError, user_id: str) -> Exception:
    code = err.code()
    text = f"user {user_id}: SpiceDB {code.name}: {err.details()}"
    if code == grpc.StatusCode.FAILED_PRECONDITION and _SCHEMA_MISMATCH in (err.details() or ""):
        return SchemaMismatch(text)
    if classify_grpc_status(code) is FailureKind.PERMANENT:
        return SpiceDBRejected(text)
    return SpiceDBUnavailable(text)


def _marker(user_id: str, version: int) -> Relationship:
    return Relationship(
        resource=ObjectReference(object_type="user", object_id=user_id),
        relation=_MARKER_RELATION,
        subject=SubjectReference(
            object=ObjectReference(object_type=_MARKER_TYPE, object_id=str(version))
        ),
    )


def _marker_filter(user_id: str, version: int | None) -> RelationshipFilter:
    return RelationshipFilter(
        resource_type="user",
        optional_resource_id=user_id,
        optional_relation=_MARKER_RELATION,
        optional_subject_filter=SubjectFilter(
            subject_type=_MARKER_TYPE, optional_subject_id="" if version is None else str(version)
        ),
    )


def _written_by(event_id: str) -> Struct:
    """Tag a write with the workflow and event that made it, so Watch and audits can tell."""
    info = activity.info()
    tag = Struct()
    tag.update(
        {
            "workflow_id": info.workflow_id,
            "run_id": info.workflow_run_id,
            "event_id": event_id,
        }
    )
    return tag


class MembershipActivities:
    """Activities on SpiceDB relationships, sharing the worker's one SpiceDB client."""

    def __init__(self, client: SpiceDBClient) -> None:
        self._client = client

    async def _read(self, user_id: str) -> MembershipsSnapshot:
        consistency = Consistency(fully_consistent=True)
        memberships = [
            Membership(
                user_id=user_id,
                org_id=r.relationship.resource.object_id,
                role=r.relationship.relation,
            )
            async for r in self._client.ReadRelationships(
                ReadRelationshipsRequest(
                    consistency=consistency,
                    relationship_filter=RelationshipFilter(
                        resource_type="organization",
                        optional_subject_filter=SubjectFilter(
                            subject_type="user", optional_subject_id=user_id
                        ),
                    ),
                ),
                timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
            )
        ]
        markers = [
            int(r.relationship.subject.object.object_id)
            async for r in self._client.ReadRelationships(
                ReadRelationshipsRequest(
                    consistency=consistency, relationship_filter=_marker_filter(user_id, None)
                ),
                timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
            )
        ]
        return MembershipsSnapshot(
            memberships=sorted(memberships, key=lambda m: (m.org_id, m.role)),
            marker=max(markers) if markers else None,
        )

    @activity.defn
    async def read_memberships(self, request: ReadMembershipsInput) -> MembershipsSnapshot:
        """Read the user's memberships and version marker, fully consistently.

        The workflow keeps this snapshot in its history as the prior state that compensation
        restores exactly.

        Raises:
            SpiceDBRejected: A permanent refusal.
            SpiceDBUnavailable: A transient failure; retried.
        """
        try:
            return await self._read(request.user_id)
        except grpc.aio.AioRpcError as err:
            raise _translate(err, request.user_id) from None

    @activity.defn
    async def write_memberships(self, request: WriteMembershipsInput) -> WriteMembershipsResult:
        """Remove and add memberships and move the version marker, in one atomic write.

        Returns:
            SpiceDB's ``written_at`` ZedToken.

        Raises:
            SupersededWrite: The marker is neither the expected one nor this write's own (a newer
                sync has applied since this write was planned); nothing was written.
            SpiceDBRejected: INVALID_ARGUMENT, FAILED_PRECONDITION (schema), UNAUTHENTICATED, ...
            SpiceDBUnavailable: UNAVAILABLE, DEADLINE_EXCEEDED, ...; retried.
        """
        uid = request.user_id
        updates = [
            RelationshipUpdate(operation=_DELETE, relationship=membership_relationship(m))
            for m in request.remove
        ] + [
            RelationshipUpdate(operation=_TOUCH, relationship=membership_relationship(m))
            for m in request.add
        ]
        if request.remove_marker is not None and request.remove_marker != request.set_marker:
            updates.append(
                RelationshipUpdate(
                    operation=_DELETE, relationship=_marker(uid, request.remove_marker)
                )
            )
        if request.set_marker is not None:
            updates.append(
                RelationshipUpdate(operation=_TOUCH, relationship=_marker(uid, request.set_marker))
            )
        preconditions = []
        if request.check_marker:
            preconditions.append(
                Precondition(
                    operation=Precondition.Operation.OPERATION_MUST_NOT_MATCH,
                    filter=_marker_filter(uid, None),
                )
                if request.expected_marker is None
                else Precondition(
                    operation=Precondition.Operation.OPERATION_MUST_MATCH,
                    filter=_marker_filter(uid, request.expected_marker),
                )
            )
        write = WriteRelationshipsRequest(
            updates=updates,
            optional_preconditions=preconditions,
            optional_transaction_metadata=_written_by(request.event_id),
        )
        try:
            response = await self._client.WriteRelationships(
                write, timeout=SPICEDB_CALL_TIMEOUT_SECONDS
            )
            return WriteMembershipsResult(zed_token=response.written_at.token)
        except grpc.aio.AioRpcError as err:
            if not (
                err.code() == grpc.StatusCode.FAILED_PRECONDITION
                and _PRECONDITION_FAILED in (err.details() or "")
            ):
                raise _translate(err, uid) from None
        return await self._after_failed_precondition(request)

    async def _after_failed_precondition(
        self, request: WriteMembershipsInput
    ) -> WriteMembershipsResult:
        try:
            current = await self._read(request.user_id)
            if request.set_marker is not None and current.marker == request.set_marker:
                # An earlier attempt of this very write landed (atomically) and this is its
                # retry: success. Touch the marker again only to obtain a ZedToken.
                response = await self._client.WriteRelationships(
                    WriteRelationshipsRequest(
                        updates=[
                            RelationshipUpdate(
                                operation=_TOUCH,
                                relationship=_marker(request.user_id, request.set_marker),
                            )
                        ],
                        optional_transaction_metadata=_written_by(request.event_id),
                    ),
                    timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
                )
                return WriteMembershipsResult(zed_token=response.written_at.token)
        except grpc.aio.AioRpcError as err:
            raise _translate(err, request.user_id) from None
        raise SupersededWrite(
            f"user {request.user_id}: SpiceDB is at version {current.marker}, this write expected"
            f" {request.expected_marker}; a newer sync has applied, nothing was written"
        )
