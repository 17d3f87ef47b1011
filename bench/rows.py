"""What the systems that keep rows share: the row insert, the batched SpiceDB write, timestamps."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from authzed.api.v1 import RelationshipUpdate, WriteRelationshipsRequest

from bench.context import BenchContext
from spicesync.models import CreateUserInput, Membership
from spicesync.spicedb import SpiceDBClient, membership_relationship

__all__ = ["INSERT_ROW", "mark_synced", "row_args", "row_completions", "write_memberships"]

INSERT_ROW = """
INSERT INTO users (id, email, name, org_id, role) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO NOTHING
"""
_TOUCH = RelationshipUpdate.Operation.OPERATION_TOUCH


def row_args(user: CreateUserInput) -> tuple[object, ...]:
    """The arguments of :data:`INSERT_ROW`."""
    return (uuid.UUID(user.user_id), user.email, user.name, user.org_id, user.role)


async def write_memberships(spicedb: SpiceDBClient, users: list[tuple[str, str, str]]) -> str:
    """TOUCH ``(user, org, role)`` memberships in one WriteRelationships; returns the ZedToken."""
    response = await spicedb.WriteRelationships(
        WriteRelationshipsRequest(
            updates=[
                RelationshipUpdate(
                    operation=_TOUCH,
                    relationship=membership_relationship(Membership(user_id=u, org_id=o, role=r)),
                )
                for u, o, r in users
            ]
        ),
        timeout=10,
    )
    return str(response.written_at.token)


async def mark_synced(conn: Any, ids: list[str], token: str) -> None:
    """Record the users as synced with the write's ZedToken."""
    await conn.execute(
        "UPDATE users SET sync_status = 'synced', synced_at = now(), zed_token = $2"
        " WHERE id = ANY($1::uuid[])",
        [uuid.UUID(i) for i in ids],
        token,
    )


async def row_completions(
    ctx: BenchContext, user_ids: list[str]
) -> dict[str, tuple[datetime | None, datetime]]:
    """``created_at`` and ``synced_at`` of every synced user."""
    rows = await ctx.pool.fetch(
        "SELECT id, created_at, synced_at FROM users"
        " WHERE id = ANY($1::uuid[]) AND synced_at IS NOT NULL",
        [uuid.UUID(u) for u in user_ids],
    )
    return {str(r["id"]): (r["created_at"], r["synced_at"]) for r in rows}
