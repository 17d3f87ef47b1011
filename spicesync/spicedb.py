"""The SpiceDB client spicesync uses everywhere, and the schema it expects."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from authzed.api.v1 import (
    AsyncClient,
    CheckBulkPermissionsRequest,
    CheckBulkPermissionsRequestItem,
    CheckPermissionRequest,
    CheckPermissionResponse,
    Consistency,
    ObjectReference,
    ReadRelationshipsRequest,
    ReadSchemaRequest,
    Relationship,
    RelationshipFilter,
    SubjectFilter,
    SubjectReference,
    WriteSchemaRequest,
    ZedToken,
)
from grpcutil import bearer_token_credentials, insecure_bearer_token_credentials

from spicesync.constants import SPICEDB_CALL_TIMEOUT_SECONDS
from spicesync.mapping import FollowMapping, Tuple
from spicesync.models import Membership, MembershipsSnapshot

__all__ = [
    "MANAGED_RELATIONS",
    "REQUIRED_RELATIONS",
    "SpiceDBClient",
    "check_schema",
    "connect_spicedb",
    "has_org_permission",
    "holds_memberships",
    "holds_relationships",
    "load_schema",
    "managed_tuple",
    "marker_filter",
    "marker_relationship",
    "membership_relationship",
    "missing_schema",
    "read_managed_relationships",
    "read_user_snapshot",
    "relations_direct_only",
    "user_memberships",
    "write_schema",
]

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Notice a dead connection quickly, so a restarted SpiceDB is reached again without waiting
    # for the kernel to give up on the old socket.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class SpiceDBClient(AsyncClient):
    """``authzed`` async client that keeps its channel so it can be closed cleanly."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials) -> None:
        self.channel = grpc.aio.secure_channel(target, credentials, _CHANNEL_OPTIONS)
        self.init_stubs(self.channel)  # type: ignore[attr-defined]

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        await self.channel.close()


def connect_spicedb(endpoint: str, preshared_key: str, *, insecure: bool = True) -> SpiceDBClient:
    """Build the client the way a SpiceDB cluster expects it.

    Args:
        endpoint: ``host:port`` of SpiceDB's gRPC API.
        preshared_key: The ``--grpc-preshared-key`` SpiceDB was started with.
        insecure: Plaintext on a local link (development); TLS otherwise.

    Returns:
        The client; close it with :meth:`SpiceDBClient.close`.
    """
    credentials = (
        insecure_bearer_token_credentials(preshared_key)
        if insecure
        else bearer_token_credentials(preshared_key)
    )
    return SpiceDBClient(endpoint, credentials)


def load_schema() -> str:
    """Return the packaged ``schema.zed``."""
    return importlib.resources.files("spicesync").joinpath("schema.zed").read_text("utf-8")


async def write_schema(client: SpiceDBClient, schema: str | None = None) -> None:
    """Write the schema (idempotent: writing the same schema twice changes nothing).

    Args:
        client: A connected client.
        schema: The schema text; the packaged one by default.
    """
    await client.WriteSchema(WriteSchemaRequest(schema=schema or load_schema()), timeout=10)


def membership_relationship(membership: Membership) -> Relationship:
    """``organization:<org>#<role>@user:<id>`` as a protobuf relationship.

    Args:
        membership: Who belongs where, in which role.

    Returns:
        The relationship message.
    """
    return Relationship(
        resource=ObjectReference(object_type="organization", object_id=membership.org_id),
        relation=membership.role,
        subject=SubjectReference(
            object=ObjectReference(object_type="user", object_id=membership.user_id)
        ),
    )


# The organization relations spicesync writes for a user; any other relation is the app's own.
MANAGED_RELATIONS: frozenset[str] = frozenset({"member", "admin"})
MARKER_RELATION = "sync_version"
MARKER_TYPE = "spicesync_version"


def marker_relationship(user_id: str, version: int) -> Relationship:
    """``user:<id>#sync_version@spicesync_version:<version>``: the version of the user's last sync.

    Args:
        user_id: The user's id.
        version: The version the sync wrote.

    Returns:
        The relationship message.
    """
    return Relationship(
        resource=ObjectReference(object_type="user", object_id=user_id),
        relation=MARKER_RELATION,
        subject=SubjectReference(
            object=ObjectReference(object_type=MARKER_TYPE, object_id=str(version))
        ),
    )


def marker_filter(user_id: str, version: int | None) -> RelationshipFilter:
    """A filter for the user's marker: any version (``None``) or exactly ``version``."""
    return RelationshipFilter(
        resource_type="user",
        optional_resource_id=user_id,
        optional_relation=MARKER_RELATION,
        optional_subject_filter=SubjectFilter(
            subject_type=MARKER_TYPE, optional_subject_id="" if version is None else str(version)
        ),
    )


async def read_user_snapshot(client: SpiceDBClient, user_id: str) -> MembershipsSnapshot:
    """The user's memberships and version marker, read fully consistently.

    Args:
        client: A connected client.
        user_id: The user's id.

    Returns:
        The memberships (sorted) and the highest marker, if any.
    """
    consistency = Consistency(fully_consistent=True)
    memberships = [
        Membership(
            user_id=user_id,
            org_id=r.relationship.resource.object_id,
            role=r.relationship.relation,
        )
        async for r in client.ReadRelationships(
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
        # Only the relations spicesync manages: an app's own relations on an organization
        # (an owner, say) are never read as drift, rewritten or rolled back.
        if r.relationship.relation in MANAGED_RELATIONS
    ]
    markers = [
        int(r.relationship.subject.object.object_id)
        async for r in client.ReadRelationships(
            ReadRelationshipsRequest(
                consistency=consistency, relationship_filter=marker_filter(user_id, None)
            ),
            timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
        )
    ]
    return MembershipsSnapshot(
        memberships=sorted(memberships, key=lambda m: (m.org_id, m.role)),
        marker=max(markers) if markers else None,
    )


async def user_memberships(client: SpiceDBClient, user_id: str) -> list[tuple[str, str]]:
    """Every ``(organization, relation)`` the user holds, read fully consistently.

    Args:
        client: A connected client.
        user_id: The user's id.

    Returns:
        The user's memberships, in SpiceDB's order.
    """
    request = ReadRelationshipsRequest(
        consistency=Consistency(fully_consistent=True),
        relationship_filter=RelationshipFilter(
            resource_type="organization",
            optional_subject_filter=SubjectFilter(subject_type="user", optional_subject_id=user_id),
        ),
    )
    return [
        (r.relationship.resource.object_id, r.relationship.relation)
        async for r in client.ReadRelationships(request, timeout=10)
    ]


async def has_org_permission(
    client: SpiceDBClient, *, user_id: str, org_id: str, permission: str, zed_token: str | None
) -> bool:
    """CheckPermission on an organization, at least as fresh as ``zed_token`` when given.

    Args:
        client: A connected client.
        user_id: The subject.
        org_id: The organization.
        permission: ``view`` or ``manage``.
        zed_token: The token of the write the check must see; fully consistent when ``None``.

    Returns:
        True if SpiceDB grants the permission (unconditionally).
    """
    consistency = (
        Consistency(at_least_as_fresh=ZedToken(token=zed_token))
        if zed_token
        else Consistency(fully_consistent=True)
    )
    response = await client.CheckPermission(
        CheckPermissionRequest(
            consistency=consistency,
            resource=ObjectReference(object_type="organization", object_id=org_id),
            permission=permission,
            subject=SubjectReference(object=ObjectReference(object_type="user", object_id=user_id)),
        ),
        timeout=5,
    )
    return bool(response.permissionship == CheckPermissionResponse.PERMISSIONSHIP_HAS_PERMISSION)


async def holds_memberships(
    client: SpiceDBClient, memberships: list[Membership], *, batch: int = 500
) -> list[bool]:
    """Ask SpiceDB (CheckBulkPermissions, fully consistent) whether each user holds its relation.

    Args:
        client: A connected client.
        memberships: What to check; a relation is checked like a permission ("is the user an
            admin of the organization?").
        batch: Items per call.

    Returns:
        One answer per membership, in order.
    """
    return await holds_relationships(
        client,
        [Tuple("organization", m.org_id, m.role, "user", m.user_id) for m in memberships],
        batch=batch,
    )


async def holds_relationships(
    client: SpiceDBClient, relationships: Sequence[Tuple], *, batch: int = 500
) -> list[bool]:
    """Ask SpiceDB (CheckBulkPermissions, fully consistent) whether each relationship holds.

    A relation is checked like a permission, so the answer is "yes" also when the schema lets
    the relation be reached another way (a subject set, a wildcard): see
    :func:`relations_direct_only` for when a yes means the relationship itself exists.

    Args:
        client: A connected client.
        relationships: What to check.
        batch: Items per call.

    Returns:
        One answer per relationship, in order.
    """
    has = CheckPermissionResponse.PERMISSIONSHIP_HAS_PERMISSION
    answers: list[bool] = []
    for start in range(0, len(relationships), batch):
        chunk = relationships[start : start + batch]
        response = await client.CheckBulkPermissions(
            CheckBulkPermissionsRequest(
                consistency=Consistency(fully_consistent=True),
                items=[
                    CheckBulkPermissionsRequestItem(
                        resource=ObjectReference(
                            object_type=r.resource_type, object_id=r.resource_id
                        ),
                        permission=r.relation,
                        subject=SubjectReference(
                            object=ObjectReference(
                                object_type=r.subject_type, object_id=r.subject_id
                            )
                        ),
                    )
                    for r in chunk
                ],
            ),
            timeout=60,
        )
        answers.extend(pair.item.permissionship == has for pair in response.pairs)
    return answers


def relations_direct_only(schema_text: str, pairs: Iterable[tuple[str, str]]) -> bool:
    """Whether a check of each (definition, relation) is true only through a direct relationship.

    True when no relation allows a subject set (``team#member``) or a wildcard (``user:*``):
    then :func:`holds_relationships` answering yes means the relationship itself exists.

    Args:
        schema_text: SpiceDB's schema, as ReadSchema returns it.
        pairs: The (definition, relation) pairs to judge.

    Returns:
        ``False`` if any relation may be reached indirectly, or is not found.
    """
    definitions = _definitions(schema_text)
    for definition, relation in pairs:
        found = re.search(rf"relation\s+{relation}\s*:([^\n]*)", definitions.get(definition, ""))
        if found is None or "#" in found[1] or ":*" in found[1].replace(" ", ""):
            return False
    return True


def _definitions(schema_text: str) -> dict[str, str]:
    """Each definition's name and body in ``schema_text``."""
    return {
        match[1]: match[2]
        for match in re.finditer(r"definition\s+([\w/]+)\s*\{(.*?)\n?\}", schema_text, re.S)
    }


# What the workflows write: (definition, relation), with the relation's subject type.
REQUIRED_RELATIONS: tuple[tuple[str, str, str], ...] = (
    ("organization", "member", "user"),
    ("organization", "admin", "user"),
    ("user", "sync_version", "spicesync_version"),
)


def missing_schema(
    schema_text: str, required: tuple[tuple[str, str, str], ...] = REQUIRED_RELATIONS
) -> list[str]:
    """List what spicesync writes that ``schema_text`` does not define.

    Args:
        schema_text: SpiceDB's schema, as ReadSchema returns it.
        required: (definition, relation, subject type) spicesync writes; owned mode's by
            default, a mapping's :meth:`~spicesync.mapping.FollowMapping.required_schema` in
            follow mode.

    Returns:
        Items such as ``organization#admin: user``; empty when everything is there.
    """
    definitions = _definitions(schema_text)
    missing = []
    for definition, relation, subject in required:
        body = definitions.get(definition)
        pattern = rf"relation\s+{relation}\s*:[^\n]*\b{subject}\b"
        if body is None or not re.search(pattern, body):
            missing.append(f"{definition}#{relation}: {subject}")
    # Every type named must be defined, subject types too (owned mode: user, organization,
    # spicesync_version).
    for definition in dict.fromkeys(t for d, _, s in required for t in (s, d)):
        if definition not in definitions:
            missing.append(f"definition {definition}")
    return missing


async def check_schema(
    client: SpiceDBClient, required: tuple[tuple[str, str, str], ...] = REQUIRED_RELATIONS
) -> list[str]:
    """Read SpiceDB's schema and list what spicesync needs that is missing.

    Args:
        client: A connected client.
        required: As in :func:`missing_schema`.

    Returns:
        The missing items; empty when everything is there.
    """
    try:
        response = await client.ReadSchema(ReadSchemaRequest(), timeout=5)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return ["the whole schema (none is defined)"]
        raise
    return missing_schema(response.schema_text, required)


async def read_managed_relationships(
    client: SpiceDBClient, mapping: FollowMapping, user_id: str
) -> frozenset[Tuple]:
    """The managed relationships SpiceDB holds for a followed user, read fully consistently.

    One read per managed resource type, filtered on the user as subject; only the mapping's
    managed (type, relation) pairs are kept, so an application's own relations on the same
    objects are never read as spicesync's. Subjects with a relation (``user:1#x``) are not the
    mapping's kind and are left out too.

    Args:
        client: A connected client.
        mapping: The follow-mode mapping.
        user_id: The user's id.

    Returns:
        The relationships.
    """
    found: set[Tuple] = set()
    for resource_type in mapping.managed_resource_types:
        async for item in client.ReadRelationships(
            ReadRelationshipsRequest(
                consistency=Consistency(fully_consistent=True),
                relationship_filter=RelationshipFilter(
                    resource_type=resource_type,
                    optional_subject_filter=SubjectFilter(
                        subject_type=mapping.subject_type, optional_subject_id=user_id
                    ),
                ),
            ),
            timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
        ):
            tuple_ = managed_tuple(mapping, item.relationship)
            if tuple_ is not None:
                found.add(tuple_)
    return frozenset(found)


def managed_tuple(mapping: FollowMapping, relationship: Relationship) -> Tuple | None:
    """``relationship`` as a :class:`~spicesync.mapping.Tuple` if spicesync manages it.

    Args:
        mapping: The follow-mode mapping.
        relationship: A relationship SpiceDB returned.

    Returns:
        The tuple; ``None`` for an application's own relation, another subject type or a
        subject with a relation.
    """
    subject = relationship.subject
    resource = relationship.resource
    if (
        (resource.object_type, relationship.relation) not in mapping.managed
        or subject.object.object_type != mapping.subject_type
        or subject.optional_relation
    ):
        return None
    return Tuple(
        resource.object_type,
        resource.object_id,
        relationship.relation,
        subject.object.object_type,
        subject.object.object_id,
    )
