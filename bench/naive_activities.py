"""The naive baseline's two activities: blocking, and a new SpiceDB client per call.

Both are plain ``def`` activities on the worker's thread pool, as code written against a
blocking driver would be. The row is inserted with asyncpg driven synchronously: each pool
thread keeps its own event loop and connection (what a psycopg connection per thread would be;
psycopg is not among the project's dependencies), and blocks its thread for the call. The
SpiceDB activity opens a new client (authzed's ``SyncClient``, a gRPC channel of its own) for
every call and drops it afterwards; it then records ``users.synced_at``, the bookkeeping every
owned-mode system of the benchmark writes, so time-to-permission is read the same way for all.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from functools import cache
from typing import Any

import asyncpg
import grpc
from authzed.api.v1 import RelationshipUpdate, SyncClient, WriteRelationshipsRequest
from grpcutil import insecure_bearer_token_credentials
from temporalio import activity

from bench.rows import INSERT_ROW, row_args
from spicesync.models import CreateUserInput, Membership
from spicesync.settings import Settings, load_settings
from spicesync.spicedb import membership_relationship

__all__ = ["naive_insert_row", "naive_write_spicedb"]

_local = threading.local()


@cache
def _settings() -> Settings:
    return load_settings()


def _blocking(query: str, *args: Any) -> None:
    """Run one statement on this thread's connection, blocking the thread until it is done."""
    if getattr(_local, "loop", None) is None:
        _local.loop = asyncio.new_event_loop()
        _local.conn = _local.loop.run_until_complete(
            asyncpg.connect(_settings().require_database_url())
        )
    _local.loop.run_until_complete(_local.conn.execute(query, *args))


def _credentials(settings: Settings, key: str) -> grpc.ChannelCredentials:
    if settings.spicedb_insecure:
        return insecure_bearer_token_credentials(key)
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(), grpc.access_token_call_credentials(key)
    )


@activity.defn
def naive_insert_row(user: CreateUserInput) -> None:
    """Insert the user's row (idempotent: a retry after a lost reply finds it there)."""
    _blocking(INSERT_ROW, *row_args(user))


@activity.defn
def naive_write_spicedb(user: CreateUserInput) -> None:
    """TOUCH the membership through a client opened for this call, then mark the row synced."""
    settings = _settings()
    endpoint, key = settings.require_spicedb()
    # A client per call, dropped at the return (its channel closes when collected): no reuse.
    client = SyncClient(endpoint, _credentials(settings, key))
    response = client.WriteRelationships(
        WriteRelationshipsRequest(
            updates=[
                RelationshipUpdate(
                    operation=RelationshipUpdate.Operation.OPERATION_TOUCH,
                    relationship=membership_relationship(
                        Membership(user_id=user.user_id, org_id=user.org_id, role=user.role)
                    ),
                )
            ]
        ),
        timeout=10,
    )
    _blocking(
        "UPDATE users SET sync_status = 'synced', synced_at = now(), zed_token = $2 WHERE id = $1",
        uuid.UUID(user.user_id),
        str(response.written_at.token),
    )
