"""The SpiceDB client spicesync uses everywhere, and the schema it expects."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from grpcutil import insecure_bearer_token_credentials

from spicesync.constants import SPICEDB_CALL_TIMEOUT_SECONDS
from spicesync.errors import (
    FailureKind,
    SchemaMismatch,
    SpiceDBRejected,
    SpiceDBUnavailable,
    classify_grpc_status,
)
from spicesync.mapping import MARKER_RELATION, MARKER_TYPE, Tuple
from spicesync.models import Membership, MembershipsSnapshot

if TYPE_CHECKING:
    from spicesync.settings import Settings

__all__ = [
    "MANAGED_RELATIONS",
    "REQUIRED_RELATIONS",
    "ManagedState",
    "SpiceDBClient",
    "check_schema",
    "connect_configured_spicedb",
    "connect_spicedb",
    "failed_precondition",
    "has_org_permission",
    "holds_memberships",
    "holds_relationships",
    "load_schema",
    "managed_tuple",
    "marker_filter",
    "marker_relationship",
    "membership_relationship",
    "missing_schema",
    "read_managed",
    "read_user_snapshot",
    "relations_direct_only",
    "revision_now",
    "spicedb_failure",
    "tuple_relationship",
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


def connect_spicedb(
    endpoint: str,
    preshared_key: str,
    *,
    insecure: bool = True,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> SpiceDBClient:
    """Build the client the way a SpiceDB cluster expects it.

    Args:
        endpoint: ``host:port`` of SpiceDB's gRPC API.
        preshared_key: The ``--grpc-preshared-key`` SpiceDB was started with.
        insecure: Plaintext on a local link (development; gRPC sends the key in clear only to
            a loopback address); TLS, the server's certificate verified, otherwise.
        ca_file: PEM roots to verify SpiceDB's certificate with; the system's roots if none.
        cert_file: A PEM client certificate (chain) for mutual TLS.
        key_file: Its PEM private key (``cert_file`` may hold both).

    Returns:
        The client; close it with :meth:`SpiceDBClient.close`.
    """
    if insecure:
        return SpiceDBClient(endpoint, insecure_bearer_token_credentials(preshared_key))
    certificate = cert_file.read_bytes() if cert_file else None
    private_key = key_file.read_bytes() if key_file else certificate
    transport = grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file else None,
        private_key=private_key if certificate else None,
        certificate_chain=certificate,
    )
    # The key rides as a bearer token on every call, over the verified channel only.
    credentials = grpc.composite_channel_credentials(
        transport, grpc.access_token_call_credentials(preshared_key)
    )
    return SpiceDBClient(endpoint, credentials)


def connect_configured_spicedb(settings: Settings) -> SpiceDBClient:
    """The client of the configured SpiceDB: endpoint, key, plaintext or TLS and its files.

    Args:
        settings: ``SPICEDB_ENDPOINT``, ``SPICEDB_PRESHARED_KEY``, ``SPICEDB_INSECURE`` and
            ``SPICEDB_TLS_CA``/``_CERT``/``_KEY``.

    Returns:
        The client; close it with :meth:`SpiceDBClient.close`.

    Raises:
        MissingSetting: The endpoint or the key is not set.
    """
    endpoint, key = settings.require_spicedb()
    return connect_spicedb(
        endpoint,
        key,
        insecure=settings.spicedb_insecure,
        ca_file=settings.spicedb_tls_ca,
        cert_file=settings.spicedb_tls_cert,
        key_file=settings.spicedb_tls_key,
    )


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


def marker_relationship(user_id: str, version: int, *, subject_type: str = "user") -> Relationship:
    """``user:<id>#sync_version@spicesync_version:<version>``: the version of the user's last sync.

    Args:
        user_id: The user's id.
        version: The version the sync wrote.
        subject_type: The users' object type (follow mode's mapping may name another).

    Returns:
        The relationship message.
    """
    return Relationship(
        resource=ObjectReference(object_type=subject_type, object_id=user_id),
        relation=MARKER_RELATION,
        subject=SubjectReference(
            object=ObjectReference(object_type=MARKER_TYPE, object_id=str(version))
        ),
    )


def marker_filter(
    user_id: str, version: int | None, *, subject_type: str = "user"
) -> RelationshipFilter:
    """A filter for the user's marker: any version (``None``) or exactly ``version``."""
    return RelationshipFilter(
        resource_type=subject_type,
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
        required: (definition, relation, subject type) triples spicesync writes: owned mode's
            by default, a follow mapping's ``required_schema()`` in follow mode.

    Returns:
        Items such as ``organization#admin: user``; empty when everything is there.
    """
    definitions = _definitions(schema_text)
    missing = []
    for definition, relation, subject in required:
        body = definitions.get(definition)
        pattern = rf"relation\s+{relation}\s*:[^\n]*(?<![\w/]){re.escape(subject)}(?![\w/])"
        if body is None or not re.search(pattern, body):
            missing.append(f"{definition}#{relation}: {subject}")
    # Every object type written, resources and subjects alike (the marker's type included).
    needed = dict.fromkeys(
        [subject for _, _, subject in required] + [definition for definition, _, _ in required]
    )
    for definition in needed:
        if definition not in definitions:
            missing.append(f"definition {definition}")
    return missing


async def check_schema(
    client: SpiceDBClient, required: tuple[tuple[str, str, str], ...] = REQUIRED_RELATIONS
) -> list[str]:
    """Read SpiceDB's schema and list what spicesync needs that is missing.

    Args:
        client: A connected client.
        required: What must be defined (see :func:`missing_schema`).
    """
    try:
        response = await client.ReadSchema(ReadSchemaRequest(), timeout=5)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return ["the whole schema (none is defined)"]
        raise
    return missing_schema(response.schema_text, required)


# A failed precondition and a schema mismatch share FAILED_PRECONDITION; the text tells them apart:
# a missing relation ("relation `admin` not found under definition `organization`") or a missing
# definition altogether ("object definition `organization` not found": an empty schema, as after
# SpiceDB restarts with its data lost and before the schema is written again).
_SCHEMA_MISMATCH = re.compile(r"not found under definition|object definition `[^`]*` not found")
_PRECONDITION_FAILED = "unable to satisfy write precondition"


def spicedb_failure(err: grpc.aio.AioRpcError, user_id: str) -> Exception:
    """The typed error for a failed SpiceDB call (opaque ids and SpiceDB's own text only).

    Args:
        err: What the call raised.
        user_id: The user the call was about, for the message.

    Returns:
        :class:`SchemaMismatch` (parks the sync), :class:`SpiceDBRejected` (permanent) or
        :class:`SpiceDBUnavailable` (retried).
    """
    code = err.code()
    text = f"user {user_id}: SpiceDB {code.name}: {err.details()}"
    if code == grpc.StatusCode.FAILED_PRECONDITION and _SCHEMA_MISMATCH.search(err.details() or ""):
        return SchemaMismatch(text)
    if classify_grpc_status(code) is FailureKind.PERMANENT:
        return SpiceDBRejected(text)
    return SpiceDBUnavailable(text)


def failed_precondition(err: grpc.aio.AioRpcError) -> bool:
    """Whether a write was refused because one of its preconditions did not hold."""
    return err.code() == grpc.StatusCode.FAILED_PRECONDITION and _PRECONDITION_FAILED in (
        err.details() or ""
    )


def tuple_relationship(relationship: Tuple) -> Relationship:
    """A mapping's :class:`~spicesync.mapping.Tuple` as a protobuf relationship."""
    return Relationship(
        resource=ObjectReference(
            object_type=relationship.resource_type, object_id=relationship.resource_id
        ),
        relation=relationship.relation,
        subject=SubjectReference(
            object=ObjectReference(
                object_type=relationship.subject_type, object_id=relationship.subject_id
            )
        ),
    )


@dataclass(frozen=True)
class ManagedState:
    """What SpiceDB holds of one user's managed relationships, and the user's markers."""

    relationships: frozenset[Tuple]
    # Every marker found (normally none or one), highest last.
    markers: tuple[int, ...]
    # The revision of the last read, for a caller that needs a ZedToken without a write.
    read_at: str | None

    @property
    def marker(self) -> int | None:
        """The highest marker, ``None`` if the user has none."""
        return self.markers[-1] if self.markers else None


async def read_managed(
    client: SpiceDBClient,
    *,
    user_id: str,
    subject_type: str,
    managed: frozenset[tuple[str, str]],
) -> ManagedState:
    """Read a user's managed relationships and marker, fully consistently.

    The marker is read first: every spicesync write moves it, so a write made under a
    precondition on the marker read here cannot have been preceded by another spicesync write
    that the relationship reads below missed.

    Args:
        client: A connected client.
        user_id: The subject's id.
        subject_type: The users' object type.
        managed: The (resource type, relation) pairs spicesync manages; every other relation on
            the same objects is the application's own and is never returned.

    Returns:
        The managed relationships the user holds, the markers, and the last read's revision.
    """
    consistency = Consistency(fully_consistent=True)
    read_at: str | None = None
    markers: list[int] = []
    async for r in client.ReadRelationships(
        ReadRelationshipsRequest(
            consistency=consistency,
            relationship_filter=marker_filter(user_id, None, subject_type=subject_type),
        ),
        timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
    ):
        read_at = r.read_at.token
        marker = r.relationship.subject.object.object_id
        if marker.isdigit():
            markers.append(int(marker))
    found: set[Tuple] = set()
    for resource_type in sorted({t for t, _ in managed}):
        async for r in client.ReadRelationships(
            ReadRelationshipsRequest(
                consistency=consistency,
                relationship_filter=RelationshipFilter(
                    resource_type=resource_type,
                    optional_subject_filter=SubjectFilter(
                        subject_type=subject_type, optional_subject_id=user_id
                    ),
                ),
            ),
            timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
        ):
            read_at = r.read_at.token
            relationship = managed_tuple(r.relationship, subject_type=subject_type, managed=managed)
            if relationship is not None:
                found.add(relationship)
    return ManagedState(frozenset(found), tuple(sorted(markers)), read_at)


def managed_tuple(
    relationship: Relationship, *, subject_type: str, managed: frozenset[tuple[str, str]]
) -> Tuple | None:
    """``relationship`` as a :class:`~spicesync.mapping.Tuple` if spicesync manages it.

    Args:
        relationship: A relationship SpiceDB returned.
        subject_type: The users' object type.
        managed: The (resource type, relation) pairs spicesync manages.

    Returns:
        The tuple; ``None`` for the application's own relation, another subject type, or a
        subject relation (``user:x#member`` is no plain user: not spicesync's).
    """
    resource, subject = relationship.resource, relationship.subject
    if (
        (resource.object_type, relationship.relation) not in managed
        or subject.object.object_type != subject_type
        or subject.optional_relation
    ):
        return None
    return Tuple(
        resource.object_type,
        resource.object_id,
        relationship.relation,
        subject_type,
        subject.object.object_id,
    )


async def revision_now(client: SpiceDBClient, *, user_id: str, subject_type: str) -> str:
    """A ZedToken of SpiceDB's current revision (a fully consistent check of the user's marker).

    For a sync that wrote nothing and read nothing: ReadRelationships returns a revision only
    with a result.
    """
    response = await client.CheckPermission(
        CheckPermissionRequest(
            consistency=Consistency(fully_consistent=True),
            resource=ObjectReference(object_type=subject_type, object_id=user_id),
            permission=MARKER_RELATION,
            subject=SubjectReference(
                object=ObjectReference(object_type=MARKER_TYPE, object_id="0")
            ),
        ),
        timeout=SPICEDB_CALL_TIMEOUT_SECONDS,
    )
    return str(response.checked_at.token)
