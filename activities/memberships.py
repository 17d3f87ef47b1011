"""SpiceDB steps of the saga: write the membership relationship, and delete it to compensate."""

from __future__ import annotations

import grpc
import grpc.aio
from authzed.api.v1 import (
    DeleteRelationshipsRequest,
    RelationshipFilter,
    RelationshipUpdate,
    SubjectFilter,
    WriteRelationshipsRequest,
)
from google.protobuf.struct_pb2 import Struct
from temporalio import activity

from spicesync.constants import SPICEDB_CALL_TIMEOUT_SECONDS
from spicesync.errors import SpiceDBRejected, SpiceDBUnavailable
from spicesync.failures import FailureKind, classify_grpc_status
from spicesync.models import (
    DeleteMembershipInput,
    DeleteMembershipResult,
    Membership,
    WriteMembershipInput,
    WriteMembershipResult,
)
from spicesync.spicedb import SpiceDBClient, membership_relationship

__all__ = ["MembershipActivities"]


def _translate(err: grpc.aio.AioRpcError, membership: Membership) -> Exception:
    code = err.code()
    text = f"user {membership.user_id}: SpiceDB {code.name}: {err.details()}"
    if classify_grpc_status(code) is FailureKind.PERMANENT:
        return SpiceDBRejected(text)
    return SpiceDBUnavailable(text)


def _written_by() -> Struct:
    """Tag a write with the workflow run that made it, so Watch and audits can tell."""
    info = activity.info()
    tag = Struct()
    tag.update({"workflow_id": info.workflow_id, "run_id": info.workflow_run_id})
    return tag


class MembershipActivities:
    """Activities on SpiceDB relationships, sharing the worker's one SpiceDB client."""

    def __init__(self, client: SpiceDBClient) -> None:
        self._client = client

    @activity.defn
    async def write_membership(self, request: WriteMembershipInput) -> WriteMembershipResult:
        """TOUCH ``organization:<org>#<role>@user:<id>``; idempotent by construction.

        Returns:
            SpiceDB's ``written_at`` ZedToken.

        Raises:
            SpiceDBRejected: INVALID_ARGUMENT, FAILED_PRECONDITION, UNAUTHENTICATED, ...
            SpiceDBUnavailable: UNAVAILABLE, DEADLINE_EXCEEDED, ...; retried.
        """
        write = WriteRelationshipsRequest(
            updates=[
                RelationshipUpdate(
                    operation=RelationshipUpdate.Operation.OPERATION_TOUCH,
                    relationship=membership_relationship(request.membership),
                )
            ],
            optional_transaction_metadata=_written_by(),
        )
        try:
            response = await self._client.WriteRelationships(
                write, timeout=SPICEDB_CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, request.membership) from None
        return WriteMembershipResult(zed_token=response.written_at.token)

    @activity.defn
    async def delete_membership(self, request: DeleteMembershipInput) -> DeleteMembershipResult:
        """Compensation: delete exactly this relationship (deleting nothing is success).

        Returns:
            SpiceDB's ``deleted_at`` ZedToken.

        Raises:
            SpiceDBRejected: A permanent refusal.
            SpiceDBUnavailable: A transient failure; retried until it succeeds.
        """
        m = request.membership
        delete = DeleteRelationshipsRequest(
            relationship_filter=RelationshipFilter(
                resource_type="organization",
                optional_resource_id=m.org_id,
                optional_relation=m.role,
                optional_subject_filter=SubjectFilter(
                    subject_type="user", optional_subject_id=m.user_id
                ),
            ),
            optional_transaction_metadata=_written_by(),
        )
        try:
            response = await self._client.DeleteRelationships(
                delete, timeout=SPICEDB_CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as err:
            raise _translate(err, m) from None
        return DeleteMembershipResult(zed_token=response.deleted_at.token)
