"""TLS to SpiceDB and PostgreSQL with a private CA and client certificates, on real servers.

SpiceDB: the real engine behind its gRPC host, serving TLS with SpiceDB's own
``--grpc-tls-cert-path``/``--grpc-tls-key-path`` (and, for mutual TLS, a client CA). PostgreSQL:
a server of the test's own (the machine's PostgreSQL server binaries, built with SSL; the
embedded one is not) with ``ssl = on`` and ``hostssl ... clientcert=verify-full`` only. The
settings are those an operator sets (docs/operations.md, "Production mode").
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
import pytest
from authzed.api.v1 import ReadSchemaRequest
from pydantic import SecretStr

from spicesync.codec import generate_key
from spicesync.db import with_database
from spicesync.settings import Settings
from spicesync.spicedb import (
    SpiceDBClient,
    check_schema,
    connect_configured_spicedb,
    connect_spicedb,
    load_schema,
    write_schema,
)
from spicesync.stack.engine_library import ensure_engine_library
from spicesync.stack.processes import free_port, spawn, stop_pid, wait_for_port
from tests.tls_certs import CertFiles, make_pki
from workers.worker import open_resources

pytestmark = pytest.mark.integration

KEY = f"tls-test-{uuid.uuid4().hex}"  # 41 characters: what production accepts


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """The CA the servers' certificates chain to, and a client certificate it signed.

    The client's name is ``postgres``: PostgreSQL's ``clientcert=verify-full`` checks it
    against the database user.
    """
    return make_pki(tmp_path_factory.mktemp("pki"), client_name="postgres")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """Another CA: whatever it signed must be refused."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), client_name="postgres")


@dataclass
class TlsSpiceDB:
    endpoint: str
    pid: int


def _start_tls_engine(pki: CertFiles, *, client_ca: Path | None) -> tuple[TlsSpiceDB, Path]:
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="spicesync-tls-spicedb-")) / "spicedb.log"
    cmd = [sys.executable, "-m", "spicesync.stack.spicedb_host", "--port", str(port)]
    cmd += [
        "--grpc-tls-cert-path",
        str(pki.server_cert),
        "--grpc-tls-key-path",
        str(pki.server_key),
    ]
    if client_ca is not None:
        cmd += ["--grpc-tls-client-ca-path", str(client_ca)]
    env = {
        "SPICEDB_LIBRARY_PATH": str(ensure_engine_library()),
        "SPICEDB_GRPC_PRESHARED_KEY": KEY,
    }
    pid = spawn(cmd, log=log, env=env)
    wait_for_port("127.0.0.1", port, pid=pid, timeout=60, log=log)
    return TlsSpiceDB(f"localhost:{port}", pid), log


@pytest.fixture(scope="module")
def tls_spicedb(pki: CertFiles) -> Iterator[TlsSpiceDB]:
    """The SpiceDB engine serving TLS only, its certificate signed by the private CA."""
    server, _log = _start_tls_engine(pki, client_ca=None)
    yield server
    stop_pid(server.pid)


@pytest.fixture(scope="module")
def mtls_spicedb(pki: CertFiles) -> Iterator[TlsSpiceDB]:
    """The same, demanding a client certificate signed by the private CA (mutual TLS)."""
    server, _log = _start_tls_engine(pki, client_ca=pki.ca)
    yield server
    stop_pid(server.pid)


def spicedb_settings(endpoint: str, **tls: Path) -> Settings:
    return Settings(
        spicedb_endpoint=endpoint,
        spicedb_preshared_key=SecretStr(KEY),
        _env_file=None,
        **tls,  # type: ignore[arg-type]
    )


async def test_spicedb_over_tls_with_a_private_ca(tls_spicedb: TlsSpiceDB, pki: CertFiles) -> None:
    settings = spicedb_settings(tls_spicedb.endpoint, spicedb_tls_ca=pki.ca)
    assert settings.spicedb_insecure is False  # a CA turns TLS on by itself
    client = connect_configured_spicedb(settings)
    try:
        await write_schema(client)
        assert (
            "definition organization"
            in (await client.ReadSchema(ReadSchemaRequest(), timeout=10)).schema_text
        )
    finally:
        await client.close()


async def assert_no_connection(client: SpiceDBClient) -> None:
    """The TLS handshake fails (UNAVAILABLE: no call reaches SpiceDB); the client is closed."""
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.ReadSchema(ReadSchemaRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.close()


async def test_spicedb_refuses_what_does_not_verify(
    tls_spicedb: TlsSpiceDB, other_pki: CertFiles
) -> None:
    # The server's certificate does not chain to this CA, nor to the system's roots.
    await assert_no_connection(
        connect_spicedb(tls_spicedb.endpoint, KEY, insecure=False, ca_file=other_pki.ca)
    )
    await assert_no_connection(connect_spicedb(tls_spicedb.endpoint, KEY, insecure=False))
    # Plaintext to a TLS-only server.
    await assert_no_connection(connect_spicedb(tls_spicedb.endpoint, KEY, insecure=True))


async def test_spicedb_mutual_tls_with_a_client_certificate(
    mtls_spicedb: TlsSpiceDB, pki: CertFiles
) -> None:
    # Without a client certificate the server ends the handshake.
    await assert_no_connection(
        connect_configured_spicedb(spicedb_settings(mtls_spicedb.endpoint, spicedb_tls_ca=pki.ca))
    )
    settings = spicedb_settings(
        mtls_spicedb.endpoint,
        spicedb_tls_ca=pki.ca,
        spicedb_tls_cert=pki.client_cert,
        spicedb_tls_key=pki.client_key,
    )
    client = connect_configured_spicedb(settings)
    try:
        await write_schema(client, load_schema())
        assert await check_schema(client) == []
    finally:
        await client.close()


def _postgres_bin() -> Path:
    """The machine's PostgreSQL server binaries (Debian's, or ``pg_config --bindir``)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.insert(0, Path(bindir.stdout.strip()))
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    pytest.fail(
        "no PostgreSQL server binaries built with SSL (the embedded ones are not): install"
        " Debian's `postgresql` (or Homebrew's)"
    )


@dataclass
class TlsPostgres:
    port: int
    url: str  # without TLS parameters


@pytest.fixture(scope="module")
def tls_postgres(pki: CertFiles) -> Iterator[TlsPostgres]:
    """A PostgreSQL of this module's own accepting only TLS with a verified client certificate."""
    binaries = _postgres_bin()
    # Outside pytest's temporary folder, which only this user may enter.
    base = Path(tempfile.mkdtemp(prefix="spicesync-tls-postgres-"))
    data = base / "data"
    # initdb refuses to run as root: run the server as the `postgres` user then.
    user = "postgres" if os.geteuid() == 0 else None
    owner = pwd.getpwnam(user) if user else None
    if owner:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    subprocess.run(
        [binaries / "initdb", "-D", data, "--auth=trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
        user=user,
    )
    for source, name in (
        (pki.ca, "ca.pem"),
        (pki.server_cert, "server.pem"),
        (pki.server_key, "server.key"),
    ):
        target = data / name
        shutil.copyfile(source, target)
        if owner:
            os.chown(target, owner.pw_uid, owner.pw_gid)
        target.chmod(0o600)  # PostgreSQL refuses a key others can read
    port = free_port()
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
            f"unix_socket_directories = '{base}'\nfsync = off\n"
            "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n"
            "ssl_ca_file = 'ca.pem'\n"
        )
    (data / "pg_hba.conf").write_text(
        "hostssl all all 127.0.0.1/32 trust clientcert=verify-full\n"
        "hostnossl all all 127.0.0.1/32 reject\n"
    )
    subprocess.run(
        [binaries / "pg_ctl", "-D", data, "-w", "-l", base / "log", "start"],
        check=True,
        capture_output=True,
        user=user,
        timeout=60,
    )
    yield TlsPostgres(port, f"postgresql://postgres@localhost:{port}/postgres")
    subprocess.run(
        [binaries / "pg_ctl", "-D", data, "-w", "-m", "fast", "stop"],
        check=False,
        capture_output=True,
        user=user,
        timeout=60,
    )
    shutil.rmtree(base, ignore_errors=True)


def verified(url: str, pki: CertFiles, *, client: bool = True) -> str:
    """``url`` with libpq's TLS parameters, as docs/operations.md tells operators to write it."""
    query = f"sslmode=verify-full&sslrootcert={pki.ca}"
    if client:
        query += f"&sslcert={pki.client_cert}&sslkey={pki.client_key}"
    return f"{url}?{query}"


async def test_the_worker_pool_connects_over_verified_tls_with_a_client_certificate(
    tls_postgres: TlsPostgres, pki: CertFiles, tls_spicedb: TlsSpiceDB
) -> None:
    settings = Settings(
        environment="production",
        database_url=verified(tls_postgres.url, pki),
        spicedb_endpoint=tls_spicedb.endpoint,
        spicedb_preshared_key=SecretStr(KEY),
        spicedb_tls_ca=pki.ca,
        encryption_keys=SecretStr(f"k1:{generate_key()}"),
        _env_file=None,
    )
    assert settings.plaintext_connections() == []
    async with open_resources(settings) as resources:
        encrypted = await resources.pool.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert encrypted is True
        await write_schema(resources.spicedb)
        assert await check_schema(resources.spicedb) == []


async def test_postgres_refuses_what_does_not_verify(
    tls_postgres: TlsPostgres, pki: CertFiles, other_pki: CertFiles
) -> None:
    # No client certificate: the server refuses.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(verified(tls_postgres.url, pki, client=False), timeout=10)
    # The server's certificate does not chain to the CA given: the client refuses.
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(verified(tls_postgres.url, other_pki), timeout=10)


def test_migrate_in_production_over_verified_tls(
    tls_postgres: TlsPostgres, pki: CertFiles, tmp_path: Path
) -> None:
    async def create_database() -> str:
        name = f"spicesync_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(verified(tls_postgres.url, pki), timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return name

    name = asyncio.run(create_database())
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_", "SPICESYNC_", "PGSSL"))
    } | {
        "SPICESYNC_ENV": "production",
        "SPICESYNC_STATE_DIR": str(tmp_path / "state"),
        "DATABASE_URL": verified(with_database(tls_postgres.url, name), pki),
        "SPICEDB_ENDPOINT": "spicedb.invalid:50051",
        "SPICEDB_PRESHARED_KEY": KEY,
        "SPICESYNC_ENCRYPTION_KEYS": f"k1:{generate_key()}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "spicesync", "migrate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "applied 0006_outbox" in done.stdout
