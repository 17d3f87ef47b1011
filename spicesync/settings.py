"""The one typed settings object for spicesync.

Values come from the environment (the variable names the stack prints: ``DATABASE_URL``,
``SPICEDB_ENDPOINT``, ``SPICEDB_PRESHARED_KEY``, ``TEMPORAL_ADDRESS``, ...) and, for local
development, from the ``stack.env`` file that ``spicesync stack up`` writes into the state
directory. The environment always wins over the file. The Temporal connection follows the SDK's
own env-config conventions (``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``,
``TEMPORAL_PROFILE``, TLS variables and the TOML profile file).

``SPICESYNC_ENV=production`` is strict (docs/operations.md, "Production mode"): every setting it
needs is explicit, every connection is TLS with the server's certificate verified (unless
``SPICESYNC_ALLOW_PLAINTEXT_IN_PRODUCTION=i-understand``, warned about at every start), secrets
are of a sane length, and a local stack's ``stack.env`` is refused rather than read.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import urllib.parse
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from temporalio.envconfig import ClientConfig, ClientConnectConfig

from spicesync.codec import EncryptionCodec, parse_keys
from spicesync.constants import DEFAULT_TASK_QUEUE
from spicesync.limits import (
    CDC_BATCH_SIZE_MAX,
    OUTBOX_BATCH_SIZE_MAX,
    OUTBOX_CONCURRENCY_MAX,
    PRESHARED_KEY_MIN_CHARS,
    SCHEDULE_INTERVAL_SECONDS_MAX,
    SCHEDULE_INTERVAL_SECONDS_MIN,
)
from spicesync.mapping import FollowMapping, load_mapping

__all__ = [
    "CODEC_TOKEN_MIN_LENGTH",
    "DEFAULT_MAPPING_FILE",
    "PLAINTEXT_OPT_OUT",
    "PLAINTEXT_OPT_OUT_VALUE",
    "STACK_ENV_FILE",
    "MissingSetting",
    "Settings",
    "UnsafeSetting",
    "database_sslmode",
    "is_loopback",
    "load_settings",
    "read_env_file",
]

STACK_ENV_FILE = "stack.env"
# A codec token guards every decrypted payload: long enough that guessing it is hopeless.
CODEC_TOKEN_MIN_LENGTH = 32
DEFAULT_MAPPING_FILE = "spicesync.toml"
# The one way to run production over connections that are not verified TLS. Loud on purpose:
# the name says what it allows, the value must be typed out, and every start logs a warning.
PLAINTEXT_OPT_OUT = "SPICESYNC_ALLOW_PLAINTEXT_IN_PRODUCTION"
PLAINTEXT_OPT_OUT_VALUE = "i-understand"
# libpq's modes that check the server's certificate (verify-ca: the chain; verify-full: the
# host name too). ``require`` encrypts but accepts any certificate, so a man in the middle too.
_VERIFYING_SSLMODES = ("verify-ca", "verify-full")

log = logging.getLogger("spicesync.settings")


class MissingSetting(RuntimeError):
    """A setting the command needs is not configured."""


class UnsafeSetting(MissingSetting):
    """A setting is present but unsafe where it is used (production).

    A kind of :class:`MissingSetting` (what is missing is the safe value), so every command
    reports it the same way: one line naming the setting, exit status 2.
    """


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` (or a bare host) names this machine (``localhost``, 127/8, ``::1``).

    Args:
        address: ``host:port``, ``[v6]:port`` or a host.

    Returns:
        True for a loopback host; False for any other name, even one that resolves locally.
    """
    host = address
    if address.startswith("["):
        host = address[1:].partition("]")[0]
    elif address.count(":") == 1:
        host = address.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def database_sslmode(url: str) -> str:
    """The libpq ``sslmode`` a connection to ``url`` uses, as asyncpg resolves it.

    Args:
        url: A ``postgresql://`` URL.

    Returns:
        The URL's ``sslmode``, else ``PGSSLMODE`` from the environment, else ``prefer``.
    """
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    if query.get("sslmode"):
        return query["sslmode"][-1]
    return os.environ.get("PGSSLMODE") or "prefer"


class Settings(BaseSettings):
    """All of spicesync's configuration.

    Secrets have no defaults: locally ``spicesync stack up`` generates the SpiceDB preshared key
    and writes it to ``stack.env``; elsewhere it must be provided.
    """

    # Errors name settings, never their values: pydantic would otherwise print every input,
    # secrets included, beside a failed check.
    model_config = SettingsConfigDict(
        extra="ignore", populate_by_name=True, hide_input_in_errors=True
    )

    environment: Literal["local", "production"] = Field(
        default="local", validation_alias="SPICESYNC_ENV"
    )
    state_dir: Path = Field(default=Path(".spicesync"), validation_alias="SPICESYNC_STATE_DIR")
    task_queue: str = Field(default=DEFAULT_TASK_QUEUE, validation_alias="SPICESYNC_TASK_QUEUE")

    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    database_pool_min_size: int = Field(default=2, ge=1, validation_alias="DATABASE_POOL_MIN")
    database_pool_max_size: int = Field(default=10, ge=1, validation_alias="DATABASE_POOL_MAX")

    spicedb_endpoint: str | None = Field(default=None, validation_alias="SPICEDB_ENDPOINT")
    spicedb_preshared_key: SecretStr | None = Field(
        default=None, validation_alias="SPICEDB_PRESHARED_KEY"
    )
    # TLS to SpiceDB: a private CA (the system's roots otherwise) and a client certificate for
    # mutual TLS. Declared before ``spicedb_insecure``, whose default depends on them.
    spicedb_tls_ca: Path | None = Field(default=None, validation_alias="SPICEDB_TLS_CA")
    spicedb_tls_cert: Path | None = Field(default=None, validation_alias="SPICEDB_TLS_CERT")
    spicedb_tls_key: Path | None = Field(default=None, validation_alias="SPICEDB_TLS_KEY")
    # Plaintext by default only locally, where the stack's SpiceDB listens on 127.0.0.1; TLS in
    # production and wherever a certificate is configured.
    spicedb_insecure: bool = Field(
        default_factory=lambda data: (
            data.get("environment") != "production"
            and not any(data.get(f"spicedb_tls_{part}") for part in ("ca", "cert", "key"))
        ),
        validation_alias="SPICEDB_INSECURE",
    )
    # See PLAINTEXT_OPT_OUT. PostgreSQL's TLS (a private CA, client certificates) is configured
    # in DATABASE_URL the libpq way: sslmode, sslrootcert, sslcert, sslkey.
    allow_plaintext_in_production: str | None = Field(
        default=None, validation_alias=PLAINTEXT_OPT_OUT
    )

    temporal_address: str = Field(default="localhost:7233", validation_alias="TEMPORAL_ADDRESS")
    temporal_namespace: str = Field(default="default", validation_alias="TEMPORAL_NAMESPACE")
    temporal_ui_url: str | None = Field(default=None, validation_alias="TEMPORAL_UI_URL")

    # Payload encryption: "id:base64key[,id:base64key...]"; the active key encrypts, all decrypt.
    encryption_keys: SecretStr | None = Field(
        default=None, validation_alias="SPICESYNC_ENCRYPTION_KEYS"
    )
    encryption_key_id: str | None = Field(
        default=None, validation_alias="SPICESYNC_ENCRYPTION_KEY_ID"
    )

    # The codec server (`spicesync codec-server`): who may call it, from which UI, and how.
    # A static bearer token (scripts, the Temporal CLI's --codec-auth, the sign-in page) and/or
    # the UI's SSO access token verified against the identity provider's JWKS.
    codec_token: SecretStr | None = Field(default=None, validation_alias="SPICESYNC_CODEC_TOKEN")
    codec_jwks_url: str | None = Field(default=None, validation_alias="SPICESYNC_CODEC_JWKS_URL")
    codec_jwt_audience: str | None = Field(
        default=None, validation_alias="SPICESYNC_CODEC_JWT_AUDIENCE"
    )
    codec_jwt_issuer: str | None = Field(
        default=None, validation_alias="SPICESYNC_CODEC_JWT_ISSUER"
    )
    codec_jwt_algorithms: str = Field(
        default="RS256,ES256", validation_alias="SPICESYNC_CODEC_JWT_ALGORITHMS"
    )
    # Comma-separated browser origins of the Temporal UI (CORS); default: the local stack's UI.
    codec_ui_origins: str | None = Field(
        default=None, validation_alias="SPICESYNC_CODEC_UI_ORIGINS"
    )
    codec_allow_encode: bool = Field(default=False, validation_alias="SPICESYNC_CODEC_ENCODE")
    codec_tls_cert: Path | None = Field(default=None, validation_alias="SPICESYNC_CODEC_TLS_CERT")
    codec_tls_key: Path | None = Field(default=None, validation_alias="SPICESYNC_CODEC_TLS_KEY")

    # Follow mode: the mapping of the application's own users table (docs/follow-mode.md). Unset,
    # ``spicesync.toml`` in the working directory is used if it exists; without one, spicesync
    # runs in owned mode (its own ``users`` table).
    config_path: Path | None = Field(default=None, validation_alias="SPICESYNC_CONFIG")

    # Observability: the worker's Prometheus endpoint, and where spans go without OTLP.
    metrics_address: str | None = Field(
        default="127.0.0.1:9464", validation_alias="SPICESYNC_METRICS_ADDRESS"
    )
    trace_file: Path | None = Field(default=None, validation_alias="SPICESYNC_TRACE_FILE")
    # The worker's /livez and /readyz (spicesync/health.py); empty: none. Loopback by default:
    # in a pod it must be 0.0.0.0:<port> so the kubelet's probes reach it. Ports on one host:
    # worker metrics 9464, outbox relay metrics 9465, worker health 9466, relay health 9467,
    # CDC relay metrics 9468, CDC relay health 9469,
    # NATS relay metrics 9470, NATS relay health 9471.
    health_address: str | None = Field(
        default="127.0.0.1:9466", validation_alias="SPICESYNC_HEALTH_ADDRESS"
    )

    # SIGTERM/SIGINT: how long a worker lets in-flight activities finish before cancelling them
    # (Temporal retries a cancelled one elsewhere). Longer than an activity's start-to-close
    # timeout (ACTIVITY_START_TO_CLOSE, 15 s), so a user's step finishes or times out on its own;
    # the process manager's kill timeout must be longer still.
    shutdown_grace_seconds: float = Field(
        default=20.0, ge=0, le=3600, validation_alias="SPICESYNC_SHUTDOWN_GRACE_SECONDS"
    )

    # Reconciliation: how often the schedule runs, whether it repairs, and how much one run may
    # delete at most (a run that would delete more deletes nothing and says so).
    reconcile_interval_seconds: float = Field(
        default=3600.0,
        ge=SCHEDULE_INTERVAL_SECONDS_MIN,
        le=SCHEDULE_INTERVAL_SECONDS_MAX,
        validation_alias="SPICESYNC_RECONCILE_INTERVAL_SECONDS",
    )
    reconcile_apply: bool = Field(default=True, validation_alias="SPICESYNC_RECONCILE_APPLY")
    reconcile_prune_cap: int = Field(
        default=1000, ge=0, validation_alias="SPICESYNC_RECONCILE_PRUNE_CAP"
    )

    # Worker tuning; unset means the SDK's default (two are spicesync's own). `spicesync bench`
    # measures the effect.
    worker_max_cached_workflows: int | None = Field(
        default=None, ge=0, validation_alias="SPICESYNC_WORKER_MAX_CACHED_WORKFLOWS"
    )
    # Workflow tasks one worker works on at once. The SDK's 100 let an overloaded worker take
    # more than it could finish: its local steps overran their budget, went to normal activities
    # and ran twice, and throughput fell (10 users/s at 100/s offered, 16 with 10 here; 2026-12-03,
    # docs/performance.md). A task's steps are short, so a few at a time keep the worker busy.
    worker_max_concurrent_workflow_tasks: int = Field(
        default=10, ge=1, validation_alias="SPICESYNC_WORKER_MAX_CONCURRENT_WORKFLOW_TASKS"
    )
    worker_max_concurrent_activities: int | None = Field(
        default=None, ge=1, validation_alias="SPICESYNC_WORKER_MAX_CONCURRENT_ACTIVITIES"
    )
    worker_workflow_task_pollers: int | None = Field(
        default=None, ge=2, validation_alias="SPICESYNC_WORKER_WORKFLOW_TASK_POLLERS"
    )
    # How long the server holds a cached workflow's next task for this worker before handing it
    # to any worker, which must then replay the history. Under overload the SDK's 10 s turned the
    # backlog into replays, more work per user and a collapse; 60 s held throughput at 4x the
    # peak (docs/performance.md). The cost: a task queued for a worker that was killed waits this
    # long before another worker takes it.
    worker_sticky_queue_seconds: float = Field(
        default=60.0, gt=0, le=600, validation_alias="SPICESYNC_WORKER_STICKY_QUEUE_SECONDS"
    )
    # Workflows run in the SDK's sandbox, which refuses non-deterministic calls at run time but
    # re-executes a workflow's module for every new instance (every user's first event) and
    # wraps every activation; off trades that guard for the worker CPU docs/performance.md
    # measures (the replay tests of recorded histories still guard determinism).
    workflow_sandbox: bool = Field(default=True, validation_alias="SPICESYNC_WORKFLOW_SANDBOX")

    # Follow mode: how long a followed user's workflow that a relay starts stays open with
    # nothing to do. 0 closes it in the workflow task that finished its last sync: no idle timer
    # and no later close (docs/follow-mode.md#lifetimes). Workers must know it before relays
    # send it (2026-12-05 or later).
    follow_idle_seconds: float = Field(
        default=600.0, ge=0, le=86400, validation_alias="SPICESYNC_FOLLOW_IDLE_SECONDS"
    )

    # The outbox relay (`spicesync relay outbox`, docs/follow-mode.md#outbox): rows claimed per
    # batch (their locks are held until Temporal has answered for them), deliveries in flight at
    # once, how often it looks without a notification, each delivery's deadline, and its own
    # Prometheus endpoint (a worker may serve the default metrics port on the same host).
    outbox_batch_size: int = Field(
        default=200, ge=1, le=OUTBOX_BATCH_SIZE_MAX, validation_alias="SPICESYNC_OUTBOX_BATCH_SIZE"
    )
    outbox_concurrency: int = Field(
        default=32,
        ge=1,
        le=OUTBOX_CONCURRENCY_MAX,
        validation_alias="SPICESYNC_OUTBOX_CONCURRENCY",
    )
    outbox_poll_seconds: float = Field(
        default=5.0, gt=0, validation_alias="SPICESYNC_OUTBOX_POLL_SECONDS"
    )
    outbox_rpc_timeout_seconds: float = Field(
        default=10.0, gt=0, validation_alias="SPICESYNC_OUTBOX_RPC_TIMEOUT_SECONDS"
    )
    outbox_metrics_address: str | None = Field(
        default="127.0.0.1:9465", validation_alias="SPICESYNC_OUTBOX_METRICS_ADDRESS"
    )
    # The relay's /livez and /readyz (ready: Temporal and PostgreSQL answer); empty: none.
    outbox_health_address: str | None = Field(
        default="127.0.0.1:9467", validation_alias="SPICESYNC_OUTBOX_HEALTH_ADDRESS"
    )

    # The CDC relay (`spicesync relay cdc`, docs/follow-mode.md#change-data-capture): the
    # publication and logical replication slot it reads the mapped table through (created by
    # `spicesync migrate` in follow mode, or at the relay's first start), messages read at once
    # (whole transactions: a bigger one is read whole), deliveries in flight, how often it looks
    # for new commits, each delivery's deadline, the slot lag that logs a warning, and its own
    # Prometheus and health endpoints.
    cdc_publication: str = Field(
        default="spicesync_follow",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        validation_alias="SPICESYNC_CDC_PUBLICATION",
    )
    cdc_slot: str = Field(
        default="spicesync_follow",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        validation_alias="SPICESYNC_CDC_SLOT",
    )
    cdc_batch_size: int = Field(
        default=1000, ge=1, le=CDC_BATCH_SIZE_MAX, validation_alias="SPICESYNC_CDC_BATCH_SIZE"
    )
    cdc_concurrency: int = Field(
        default=32, ge=1, le=OUTBOX_CONCURRENCY_MAX, validation_alias="SPICESYNC_CDC_CONCURRENCY"
    )
    cdc_poll_seconds: float = Field(
        default=0.5, gt=0, validation_alias="SPICESYNC_CDC_POLL_SECONDS"
    )
    cdc_rpc_timeout_seconds: float = Field(
        default=10.0, gt=0, validation_alias="SPICESYNC_CDC_RPC_TIMEOUT_SECONDS"
    )
    cdc_lag_warn_bytes: int = Field(
        default=1024**3, ge=1, validation_alias="SPICESYNC_CDC_LAG_WARN_BYTES"
    )
    cdc_metrics_address: str | None = Field(
        default="127.0.0.1:9468", validation_alias="SPICESYNC_CDC_METRICS_ADDRESS"
    )
    cdc_health_address: str | None = Field(
        default="127.0.0.1:9469", validation_alias="SPICESYNC_CDC_HEALTH_ADDRESS"
    )

    # The NATS JetStream relay (`spicesync relay nats`, docs/follow-mode.md#nats-jetstream): a
    # durable pull consumer named SPICESYNC_NATS_DURABLE on the stream's subjects (comma-
    # separated); created, with the stream, only when SPICESYNC_NATS_CREATE says so.
    nats_url: str = Field(default="nats://127.0.0.1:4222", validation_alias="SPICESYNC_NATS_URL")
    nats_stream: str | None = Field(default=None, validation_alias="SPICESYNC_NATS_STREAM")
    nats_subjects: str | None = Field(default=None, validation_alias="SPICESYNC_NATS_SUBJECTS")
    nats_durable: str = Field(default="spicesync-relay", validation_alias="SPICESYNC_NATS_DURABLE")
    nats_create: bool = Field(default=False, validation_alias="SPICESYNC_NATS_CREATE")
    nats_batch_size: int = Field(
        default=100, ge=1, le=OUTBOX_BATCH_SIZE_MAX, validation_alias="SPICESYNC_NATS_BATCH_SIZE"
    )
    nats_concurrency: int = Field(
        default=32, ge=1, le=OUTBOX_CONCURRENCY_MAX, validation_alias="SPICESYNC_NATS_CONCURRENCY"
    )
    nats_rpc_timeout_seconds: float = Field(
        default=10.0, gt=0, validation_alias="SPICESYNC_NATS_RPC_TIMEOUT_SECONDS"
    )
    # Credentials, one kind at most: a .creds file (JWT and nkey), a token, or user + password.
    nats_creds_file: Path | None = Field(default=None, validation_alias="SPICESYNC_NATS_CREDS")
    nats_token: SecretStr | None = Field(default=None, validation_alias="SPICESYNC_NATS_TOKEN")
    nats_user: str | None = Field(default=None, validation_alias="SPICESYNC_NATS_USER")
    nats_password: SecretStr | None = Field(
        default=None, validation_alias="SPICESYNC_NATS_PASSWORD"
    )
    # TLS (on with a tls:// URL or any of these): a private CA, a client certificate (mTLS).
    nats_tls_ca: Path | None = Field(default=None, validation_alias="SPICESYNC_NATS_TLS_CA")
    nats_tls_cert: Path | None = Field(default=None, validation_alias="SPICESYNC_NATS_TLS_CERT")
    nats_tls_key: Path | None = Field(default=None, validation_alias="SPICESYNC_NATS_TLS_KEY")
    nats_metrics_address: str | None = Field(
        default="127.0.0.1:9470", validation_alias="SPICESYNC_NATS_METRICS_ADDRESS"
    )
    nats_health_address: str | None = Field(
        default="127.0.0.1:9471", validation_alias="SPICESYNC_NATS_HEALTH_ADDRESS"
    )

    # Ports of the local stack (``spicesync stack up``); unused when pointing at real services.
    stack_temporal_port: int = Field(default=7233, validation_alias="SPICESYNC_TEMPORAL_PORT")
    stack_temporal_ui_port: int = Field(default=8233, validation_alias="SPICESYNC_TEMPORAL_UI_PORT")
    stack_spicedb_port: int = Field(default=50051, validation_alias="SPICESYNC_SPICEDB_PORT")
    stack_codec_port: int = Field(default=8081, validation_alias="SPICESYNC_CODEC_PORT")

    @field_validator(
        "codec_token",
        "codec_jwks_url",
        "codec_jwt_audience",
        "codec_jwt_issuer",
        "codec_ui_origins",
        "codec_tls_cert",
        "codec_tls_key",
        "nats_stream",
        "nats_subjects",
        "nats_creds_file",
        "nats_token",
        "nats_user",
        "nats_password",
        "nats_tls_ca",
        "nats_tls_cert",
        "nats_tls_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `SPICESYNC_CODEC_TOKEN=` as deploy/env.example leaves it means "not set", not "".
        return None if value == "" else value

    @field_validator("codec_token")
    @classmethod
    def _codec_token_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < CODEC_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"must be at least {CODEC_TOKEN_MIN_LENGTH} characters"
                " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return value

    @field_validator("codec_ui_origins")
    @classmethod
    def _codec_origins_explicit(cls, value: str | None) -> str | None:
        if value is not None and "*" in value:
            raise ValueError("list the UI's origins; '*' would let any web page call it")
        return value

    @model_validator(mode="after")
    def _codec_settings_complete(self) -> Settings:
        if (self.codec_tls_cert is None) != (self.codec_tls_key is None):
            raise ValueError("SPICESYNC_CODEC_TLS_CERT and SPICESYNC_CODEC_TLS_KEY go together")
        if self.codec_jwks_url and not (self.codec_jwt_audience and self.codec_jwt_issuer):
            raise ValueError(
                "SPICESYNC_CODEC_JWKS_URL needs SPICESYNC_CODEC_JWT_AUDIENCE and"
                " SPICESYNC_CODEC_JWT_ISSUER: without them any token the provider signed for"
                " any application would be accepted"
            )
        return self

    @model_validator(mode="after")
    def _check(self) -> Settings:
        problems = self._problems()
        if self.environment == "production":
            problems += self._production_problems()
        if problems:
            # One line, naming each setting; never a value (some are secrets).
            raise ValueError("; ".join(problems))
        return self

    def _problems(self) -> list[str]:
        """What is wrong in any environment: unusable keys, missing or contradictory TLS files."""
        problems: list[str] = []
        if self.encryption_keys is not None:
            try:
                keys = parse_keys(self.encryption_keys.get_secret_value())
            except ValueError as err:  # its message names key ids, never key material
                problems.append(f"SPICESYNC_ENCRYPTION_KEYS: {err}")
            else:
                if self.encryption_key_id and self.encryption_key_id not in keys:
                    problems.append(
                        f"SPICESYNC_ENCRYPTION_KEY_ID {self.encryption_key_id!r} is not among the"
                        " ids in SPICESYNC_ENCRYPTION_KEYS"
                    )
        for name, path in (
            ("SPICEDB_TLS_CA", self.spicedb_tls_ca),
            ("SPICEDB_TLS_CERT", self.spicedb_tls_cert),
            ("SPICEDB_TLS_KEY", self.spicedb_tls_key),
        ):
            if path is not None and not path.is_file():
                problems.append(f"{name}: no such file {path}")
        if self.spicedb_tls_key is not None and self.spicedb_tls_cert is None:
            problems.append(
                "SPICEDB_TLS_KEY is set without SPICEDB_TLS_CERT (the client certificate)"
            )
        tls_files = self.spicedb_tls_ca or self.spicedb_tls_cert or self.spicedb_tls_key
        if tls_files and self.spicedb_insecure:
            problems.append(
                "SPICEDB_TLS_CA/CERT/KEY are set but SPICEDB_INSECURE=true: unset one of them"
            )
        return problems

    def _production_problems(self) -> list[str]:
        """What production refuses: implicit services, short keys, unverified connections."""
        missing = [
            name
            for name, value in (
                ("DATABASE_URL", self.database_url),
                ("SPICEDB_ENDPOINT", self.spicedb_endpoint),
                ("SPICEDB_PRESHARED_KEY", self.spicedb_preshared_key),
                ("SPICESYNC_ENCRYPTION_KEYS", self.encryption_keys),
            )
            if not value
        ]
        problems = (
            ["SPICESYNC_ENV=production needs " + ", ".join(missing) + " to be set"]
            if missing
            else []
        )
        key = self.spicedb_preshared_key
        if key is not None and 0 < len(key.get_secret_value()) < PRESHARED_KEY_MIN_CHARS:
            problems.append(
                f"SPICEDB_PRESHARED_KEY is shorter than {PRESHARED_KEY_MIN_CHARS} characters: use"
                " a long random key (e.g. `openssl rand -base64 32`)"
            )
        opt_out = self.allow_plaintext_in_production
        if opt_out and opt_out != PLAINTEXT_OPT_OUT_VALUE:
            problems.append(f"{PLAINTEXT_OPT_OUT} must be {PLAINTEXT_OPT_OUT_VALUE!r} or unset")
            return problems
        plaintext = self.plaintext_connections()
        if plaintext and not opt_out:
            problems += plaintext
        elif plaintext:
            log.warning(
                "%s is set: production runs over connections that are not verified TLS; "
                "secrets and user data can be read or changed on the way: %s",
                PLAINTEXT_OPT_OUT,
                "; ".join(plaintext),
            )
        return problems

    def plaintext_connections(self) -> list[str]:
        """The connections to SpiceDB and PostgreSQL that are not verified TLS, each explained.

        Temporal's connection is judged where it is built (:meth:`temporal_connect_config`):
        its TLS comes from the SDK's env-config, profile files included.

        Returns:
            One sentence per connection, naming the setting to change; empty when all verify.
        """
        found: list[str] = []
        if self.spicedb_insecure:
            found.append(
                "SPICEDB_INSECURE=true sends the preshared key and every relationship in clear:"
                " use TLS (SPICEDB_INSECURE=false; SPICEDB_TLS_CA for a private CA)"
            )
        if self.database_url:
            sslmode = database_sslmode(self.database_url)
            if sslmode not in _VERIFYING_SSLMODES:
                found.append(
                    f"DATABASE_URL connects with sslmode={sslmode}, which does not verify the"
                    " server's certificate: add sslmode=verify-full to the URL (and"
                    " sslrootcert=<CA file> for a private CA)"
                )
        return found

    def nats_tls(self) -> bool:
        """Whether the link to NATS is TLS (a ``tls://`` URL, or a TLS file configured)."""
        urls = [u.strip() for u in self.nats_url.split(",") if u.strip()]
        return all(u.lower().startswith("tls://") for u in urls) or any(
            (self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key)
        )

    def nats_subject_list(self) -> list[str]:
        """``SPICESYNC_NATS_SUBJECTS`` as a list (empty when unset)."""
        return [s.strip() for s in (self.nats_subjects or "").split(",") if s.strip()]

    def nats_problems(self) -> list[str]:
        """What ``spicesync relay nats`` refuses to start with, each naming its setting.

        Judged where the relay starts, not for every command: only the relay talks to NATS.
        Production needs credentials and TLS (the plaintext opt-out allows the latter only).

        Returns:
            One sentence per problem; empty when the relay may connect.
        """
        problems = []
        if not self.nats_stream:
            problems.append("SPICESYNC_NATS_STREAM is not set (the JetStream stream to follow)")
        if self.nats_create and not self.nats_subject_list():
            problems.append("SPICESYNC_NATS_CREATE=true needs SPICESYNC_NATS_SUBJECTS")
        if (self.nats_user is None) != (self.nats_password is None):
            problems.append("SPICESYNC_NATS_USER and SPICESYNC_NATS_PASSWORD go together")
        kinds = [
            k
            for k, v in (
                ("SPICESYNC_NATS_CREDS", self.nats_creds_file),
                ("SPICESYNC_NATS_TOKEN", self.nats_token),
                ("SPICESYNC_NATS_USER", self.nats_user),
            )
            if v is not None
        ]
        if len(kinds) > 1:
            problems.append(f"set one kind of NATS credentials, not {' and '.join(kinds)}")
        for name, path in (
            ("SPICESYNC_NATS_CREDS", self.nats_creds_file),
            ("SPICESYNC_NATS_TLS_CA", self.nats_tls_ca),
            ("SPICESYNC_NATS_TLS_CERT", self.nats_tls_cert),
            ("SPICESYNC_NATS_TLS_KEY", self.nats_tls_key),
        ):
            if path is not None and not path.is_file():
                problems.append(f"{name}: no such file {path}")
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            problems.append("SPICESYNC_NATS_TLS_CERT and SPICESYNC_NATS_TLS_KEY go together")
        if self.environment != "production":
            return problems
        if not kinds:
            problems.append(
                "SPICESYNC_ENV=production needs NATS credentials: SPICESYNC_NATS_CREDS, or"
                " SPICESYNC_NATS_TOKEN, or SPICESYNC_NATS_USER and SPICESYNC_NATS_PASSWORD"
            )
        if not self.nats_tls():
            plaintext = (
                "SPICESYNC_NATS_URL has no TLS: credentials and every message go in clear; use"
                " a tls:// URL (SPICESYNC_NATS_TLS_CA for a private CA)"
            )
            if self.allow_plaintext_in_production != PLAINTEXT_OPT_OUT_VALUE:
                problems.append(plaintext)
            else:
                log.warning("%s is set: %s", PLAINTEXT_OPT_OUT, plaintext)
        return problems

    def mapping_path(self) -> Path | None:
        """The follow-mode mapping file, or ``None`` in owned mode.

        An explicit ``SPICESYNC_CONFIG`` is returned even if the file is missing, so that
        loading it fails with a clear error instead of silently falling back to owned mode.
        """
        if self.config_path is not None:
            return self.config_path
        default = Path(DEFAULT_MAPPING_FILE)
        return default if default.is_file() else None

    def follow_mapping(self) -> FollowMapping | None:
        """Load and validate the mapping; ``None`` in owned mode.

        Raises:
            MappingError: The file is missing or invalid (the message names the key).
        """
        path = self.mapping_path()
        return None if path is None else load_mapping(path)

    def require_database_url(self) -> str:
        """Return ``DATABASE_URL`` or raise a clear error naming it."""
        if not self.database_url:
            raise MissingSetting("DATABASE_URL is not set: run `spicesync stack up` or export it")
        return self.database_url

    def require_spicedb(self) -> tuple[str, str]:
        """Return the SpiceDB endpoint and preshared key or raise a clear error naming them."""
        if not self.spicedb_endpoint or self.spicedb_preshared_key is None:
            raise MissingSetting(
                "SPICEDB_ENDPOINT and SPICEDB_PRESHARED_KEY must be set: run `spicesync stack up`"
                " or export them"
            )
        return self.spicedb_endpoint, self.spicedb_preshared_key.get_secret_value()

    def worker_environment(
        self, *, task_queue: str, database_url: str, spicedb_endpoint: str, spicedb_key: str
    ) -> dict[str, str]:
        """The environment of a ``spicesync worker`` process on these (or the given) engines.

        The caller's own spicesync, Temporal and store variables are dropped, so the child sees
        exactly this configuration; Temporal and encryption come from these settings. Used to
        start worker processes the benchmark and the fault suite control.
        """
        # Worker tuning (SPICESYNC_WORKER_*, the sandbox switch) passes through, so a benchmark
        # can vary it.
        base = {
            k: v
            for k, v in os.environ.items()
            if k.startswith("SPICESYNC_WORKER_")
            or k == "SPICESYNC_WORKFLOW_SANDBOX"
            or not k.startswith(("TEMPORAL_", "SPICEDB_", "DATABASE_URL", "SPICESYNC_"))
        }
        env = base | {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_NAMESPACE": self.temporal_namespace,
            "DATABASE_URL": database_url,
            "SPICEDB_ENDPOINT": spicedb_endpoint,
            "SPICEDB_PRESHARED_KEY": spicedb_key,
            "SPICESYNC_TASK_QUEUE": task_queue,
            "SPICESYNC_METRICS_ADDRESS": "",
            "SPICESYNC_HEALTH_ADDRESS": "",
            # Below the 10-15 s after which the bench and the fault suite SIGKILL a worker
            # they stop, so their SIGTERM still drains (or cancels) rather than kills.
            "SPICESYNC_SHUTDOWN_GRACE_SECONDS": "5",
            "SPICESYNC_STATE_DIR": "/nonexistent-worker-state",
        }
        if self.encryption_keys is not None:
            env["SPICESYNC_ENCRYPTION_KEYS"] = self.encryption_keys.get_secret_value()
        if self.encryption_key_id:
            env["SPICESYNC_ENCRYPTION_KEY_ID"] = self.encryption_key_id
        return env

    def codec_origins(self) -> list[str]:
        """The Temporal UI origins the codec server answers (CORS), from the setting or local."""
        if self.codec_ui_origins:
            return [o.strip().rstrip("/") for o in self.codec_ui_origins.split(",") if o.strip()]
        return [
            self.temporal_ui_url or f"http://127.0.0.1:{self.stack_temporal_ui_port}",
            f"http://localhost:{self.stack_temporal_ui_port}",
        ]

    def follow_idle(self) -> timedelta:
        """How long a followed user's workflow that a relay starts stays open with nothing to do."""
        return timedelta(seconds=self.follow_idle_seconds)

    def trace_path(self) -> Path | None:
        """Where spans go when no OTLP endpoint is configured; ``None``: nowhere.

        Locally a file in the state directory. In production only ``SPICESYNC_TRACE_FILE``: a
        file nobody rotates, written by default, would fill a container's disk (or fail on a
        read-only root filesystem); production traces go to OTLP.
        """
        if self.trace_file is not None:
            return self.trace_file
        if self.environment == "production":
            return None
        return self.state_dir / "logs" / "traces.jsonl"

    def codec(self) -> EncryptionCodec | None:
        """The payload codec, or ``None`` when no keys are configured (local use only)."""
        if self.encryption_keys is None:
            return None
        keys = parse_keys(self.encryption_keys.get_secret_value())
        return EncryptionCodec(keys, self.encryption_key_id or next(iter(keys)))

    def temporal_connect_config(self) -> ClientConnectConfig:
        """Load the Temporal connection the SDK's env-config way.

        The stack's ``TEMPORAL_*`` values act as the environment's defaults, so a profile file
        or real environment variables still override them. In production, a Temporal that is
        not on this machine must be reached over TLS.

        Returns:
            Keyword arguments for ``temporalio.client.Client.connect``.

        Raises:
            UnsafeSetting: Production, a non-local address and no TLS, without the opt-out.
        """
        env = {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "TEMPORAL_NAMESPACE": self.temporal_namespace,
        }
        env.update(os.environ)
        config = ClientConfig.load_client_connect_config(override_env_vars=env)
        address = config.get("target_host", self.temporal_address)
        # The SDK always verifies Temporal's certificate when TLS is on (True or a TLSConfig).
        if self.environment == "production" and not config.get("tls") and not is_loopback(address):
            problem = (
                f"TEMPORAL_ADDRESS {address} is not on this machine and the connection has no"
                " TLS: set TEMPORAL_TLS=true (TEMPORAL_TLS_SERVER_CA_CERT_PATH for a private CA,"
                " TEMPORAL_TLS_CLIENT_CERT_PATH/_KEY_PATH for mutual TLS) or use a TLS profile"
            )
            if self.allow_plaintext_in_production != PLAINTEXT_OPT_OUT_VALUE:
                raise UnsafeSetting(problem)
            log.warning("%s is set: %s", PLAINTEXT_OPT_OUT, problem)
        return config


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``KEY=value`` file as written by ``spicesync stack up``.

    Args:
        path: The file; a missing file reads as empty.

    Returns:
        The variables in file order.
    """
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, falling back to the local stack's ``stack.env``.

    Args:
        **overrides: Field values that win over every source (tests use this).

    Returns:
        The settings.

    Raises:
        UnsafeSetting: Production, and a local stack's ``stack.env`` is there: its plaintext
            local services and generated key must never stand in for production's settings.
    """
    state_dir = Path(os.environ.get("SPICESYNC_STATE_DIR", ".spicesync"))
    stack_file = state_dir / STACK_ENV_FILE
    try:
        present = stack_file.is_file()
    except PermissionError:
        # A state folder this user may not look into (a root-owned 0700 mount, another
        # service's StateDirectory): no stack.env can be read from it either.
        present = False
    if not present:
        return Settings(**overrides)
    environment = overrides.get("environment") or next(
        (v for k, v in os.environ.items() if k.upper() == "SPICESYNC_ENV"), None
    )
    if environment == "production":
        raise UnsafeSetting(
            f"SPICESYNC_ENV=production, but {stack_file} (a local stack's settings) is there:"
            " production takes its settings from the environment only; remove the file or point"
            " SPICESYNC_STATE_DIR elsewhere"
        )
    return Settings(_env_file=stack_file, **overrides)
