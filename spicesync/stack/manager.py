"""``spicesync stack up | status | down``: the local stack's lifecycle.

``up`` starts only what is not configured already (``TEMPORAL_ADDRESS``, ``DATABASE_URL`` and
``SPICEDB_ENDPOINT`` in the environment mean "use mine"), records what it started in
``<state dir>/stack.json`` and writes the connection settings to ``<state dir>/stack.env``,
which every other spicesync command reads. ``down`` stops exactly what ``up`` recorded.

Secrets (the SpiceDB preshared key, the encryption keys, the codec token, a database password)
live in ``stack.env`` alone, a 0600 file in a 0700 folder; ``stack.json`` holds none, and what
the commands print hides them unless asked (:func:`printable_env`).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from spicesync.codec import generate_key
from spicesync.private_files import create_private, private_dir, write_private
from spicesync.settings import STACK_ENV_FILE, Settings, read_env_file
from spicesync.stack.components import (
    embedded_postgres_group,
    prepare_app_db,
    prepare_spicedb,
    start_codec_server,
    start_embedded_postgres,
    start_spicedb,
    start_temporal,
    stop_embedded_postgres,
    wait_for_spicedb,
    wait_for_temporal,
)
from spicesync.stack.processes import pid_alive, port_open, stop_pid, wait_for_port
from spicesync.stack.relays import RelayRecord, relay_health, running_relays

__all__ = [
    "SECRET_SETTINGS",
    "Component",
    "StackState",
    "printable_env",
    "stack_down",
    "stack_status",
    "stack_up",
]

_STATE_FILE = "stack.json"
# The settings whose values are secrets: never in stack.json, never printed unless asked.
SECRET_SETTINGS = ("SPICEDB_PRESHARED_KEY", "SPICESYNC_ENCRYPTION_KEYS", "SPICESYNC_CODEC_TOKEN")
_HIDDEN = "<hidden>"


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:  # none, or empty (the embedded PostgreSQL trusts its socket)
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{_HIDDEN}@{host}"))


def printable_env(env: dict[str, str], *, show_secrets: bool = False) -> list[str]:
    """``KEY=value`` lines of the stack's settings, secrets hidden unless ``show_secrets``.

    Hidden secrets are left out (a script that sources the lines gets no fake value) and a
    comment line names them; a database URL keeps everything but its password.
    """
    if show_secrets:
        return [f"{key}={value}" for key, value in env.items()]
    lines = [
        f"{key}={_hide_password(value) if key == 'DATABASE_URL' else value}"
        for key, value in env.items()
        if key not in SECRET_SETTINGS
    ]
    hidden = [key for key in env if key in SECRET_SETTINGS]
    if hidden:
        lines.append(
            f"# secrets not shown: {', '.join(hidden)} (in {STACK_ENV_FILE}, mode 0600;"
            " `spicesync stack env --show-secrets` prints them)"
        )
    return lines


@dataclass
class Component:
    """One engine of the stack."""

    name: str
    label: str
    managed: bool  # started by `stack up` (and so stopped by `stack down`)
    pid: int | None = None
    log: str | None = None
    data_dir: str | None = None


@dataclass
class StackState:
    """What ``stack up`` started and the settings it produced."""

    env: dict[str, str] = field(default_factory=dict)
    components: list[Component] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: Path) -> StackState:
        """Read the state file (components) and ``stack.env`` (settings); absent: empty."""
        path = state_dir / _STATE_FILE
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            env=read_env_file(state_dir / STACK_ENV_FILE),
            components=[Component(**c) for c in raw["components"]],
        )

    def save(self, state_dir: Path) -> None:
        """Write ``stack.env`` (every setting, secrets included) and the state file (none)."""
        _lock(state_dir)
        write_private(
            state_dir / STACK_ENV_FILE, "".join(f"{k}={v}\n" for k, v in self.env.items())
        )
        write_private(
            state_dir / _STATE_FILE,
            json.dumps({"components": [asdict(c) for c in self.components]}, indent=2),
        )

    def component(self, name: str) -> Component | None:
        """The component called ``name``, if recorded."""
        return next((c for c in self.components if c.name == name), None)


def _lock(state_dir: Path) -> Path:
    # 0700; 0710 for the group the embedded PostgreSQL runs with when run as root (and
    # embedded-postgres opens the folders above its data folder to all when it starts: this
    # narrows them back).
    return private_dir(state_dir, group=embedded_postgres_group())


def _running(component: Component | None) -> bool:
    if component is None:
        return False
    if component.name == "postgres" and component.data_dir:
        return (Path(component.data_dir) / "postmaster.pid").exists()
    return not component.managed or pid_alive(component.pid)


async def stack_up(
    settings: Settings, *, on_ready: Callable[[Settings], Awaitable[object]] | None = None
) -> StackState:
    """Start whatever is not running yet, wait for readiness, migrate, write the schema.

    In follow mode only the ``spicesync_*`` tables are migrated and SpiceDB's schema is left
    to the application (docs/follow-mode.md).

    Idempotent: a second ``up`` reuses the running engines.

    Args:
        settings: Ports and the state directory.
        on_ready: Called with the stack's connection settings once it is ready (the CLI
            keeps the reconcile schedule this way: this package does not import starters).

    Returns:
        The stack's state, whose ``env`` holds the connection settings.
    """
    # Follow mode (a mapping is configured): the application owns its users table and its
    # SpiceDB schema, so neither spicesync's `users` table nor its packaged schema is written.
    # Loaded first, so a bad mapping stops `up` before anything starts.
    mapping = settings.follow_mapping()
    state_dir = _lock(settings.state_dir.resolve())
    logs = state_dir / "logs"
    old = StackState.load(state_dir)
    new = StackState()

    # Payload encryption: the key outlives `stack down`, like the history it encrypted.
    if "SPICESYNC_ENCRYPTION_KEYS" in os.environ:
        keys = os.environ["SPICESYNC_ENCRYPTION_KEYS"]
    else:
        key_file = state_dir / "encryption-keys"
        create_private(key_file, f"local1:{generate_key()}\n")  # kept if it exists
        keys = key_file.read_text().strip()
    new.env["SPICESYNC_ENCRYPTION_KEYS"] = keys
    codec_endpoint = f"http://127.0.0.1:{settings.stack_codec_port}"

    # Temporal
    if "TEMPORAL_ADDRESS" in os.environ:
        new.components.append(
            Component("temporal", f"external {os.environ['TEMPORAL_ADDRESS']}", False)
        )
        new.env["TEMPORAL_ADDRESS"] = os.environ["TEMPORAL_ADDRESS"]
    else:
        port, ui_port = settings.stack_temporal_port, settings.stack_temporal_ui_port
        temporal = old.component("temporal")
        if not (_running(temporal) and temporal and temporal.managed):
            if port_open("127.0.0.1", port):
                raise RuntimeError(
                    f"port {port} is taken by something `stack up` did not start; set"
                    " SPICESYNC_TEMPORAL_PORT or TEMPORAL_ADDRESS"
                )
            log = logs / "temporal.log"
            pid = start_temporal(
                port=port,
                ui_port=ui_port,
                db_file=state_dir / "temporal.db",
                log=log,
                codec_endpoint=codec_endpoint,
            )
            temporal = Component(
                "temporal", "Temporal dev server (SQLite, WAL)", True, pid, str(log)
            )
            await wait_for_temporal(f"127.0.0.1:{port}", pid=pid, timeout=60, log=log)
        new.components.append(temporal)
        new.env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{port}"
        new.env["TEMPORAL_UI_URL"] = f"http://127.0.0.1:{ui_port}"

        codec = old.component("codec")
        codec_token = old.env.get("SPICESYNC_CODEC_TOKEN")
        if not (_running(codec) and codec and codec.managed and codec_token):
            port_c = settings.stack_codec_port
            if port_open("127.0.0.1", port_c):
                raise RuntimeError(f"port {port_c} is taken; set SPICESYNC_CODEC_PORT")
            # Generated per codec server, like the preshared key: it guards decrypted payloads.
            codec_token = secrets.token_urlsafe(32)
            log = logs / "codec-server.log"
            pid = start_codec_server(
                port=port_c, keys=keys, token=codec_token, ui_port=ui_port, log=log
            )
            codec = Component("codec", "payload codec server for the UI", True, pid, str(log))
            wait_for_port("127.0.0.1", port_c, pid=pid, timeout=30, log=log)
        new.components.append(codec)
        new.env["SPICESYNC_CODEC_ENDPOINT"] = codec_endpoint
        new.env["SPICESYNC_CODEC_TOKEN"] = codec_token
    new.env["TEMPORAL_NAMESPACE"] = os.environ.get("TEMPORAL_NAMESPACE", "default")
    new.env["SPICESYNC_TASK_QUEUE"] = settings.task_queue

    # PostgreSQL
    if "DATABASE_URL" in os.environ:
        new.components.append(Component("postgres", "external DATABASE_URL", False))
        new.env["DATABASE_URL"] = os.environ["DATABASE_URL"]
    else:
        data_dir = state_dir / "postgres"
        log = data_dir / "log"
        url = await asyncio.to_thread(start_embedded_postgres, data_dir)
        _lock(state_dir)
        new.components.append(
            Component("postgres", "embedded PostgreSQL", True, None, str(log), str(data_dir))
        )
        new.env["DATABASE_URL"] = url

    # SpiceDB
    if "SPICEDB_ENDPOINT" in os.environ:
        new.components.append(
            Component("spicedb", f"external {os.environ['SPICEDB_ENDPOINT']}", False)
        )
        new.env["SPICEDB_ENDPOINT"] = os.environ["SPICEDB_ENDPOINT"]
        key = settings.spicedb_preshared_key
        if key is None:
            raise RuntimeError("SPICEDB_ENDPOINT is set, so SPICEDB_PRESHARED_KEY must be too")
        new.env["SPICEDB_PRESHARED_KEY"] = key.get_secret_value()
    else:
        port = settings.stack_spicedb_port
        spicedb = old.component("spicedb")
        key_text = old.env.get("SPICEDB_PRESHARED_KEY")
        if not (_running(spicedb) and spicedb and spicedb.managed and key_text):
            if port_open("127.0.0.1", port):
                raise RuntimeError(
                    f"port {port} is taken by something `stack up` did not start; set"
                    " SPICESYNC_SPICEDB_PORT or SPICEDB_ENDPOINT"
                )
            # Generated, never defaulted: each local stack gets its own key.
            key_text = secrets.token_urlsafe(24)
            log = logs / "spicedb.log"
            pid, label = await asyncio.to_thread(
                start_spicedb, port=port, preshared_key=key_text, log=log
            )
            spicedb = Component("spicedb", label, True, pid, str(log))
            wait_for_port("127.0.0.1", port, pid=pid, timeout=60, log=log)
        new.components.append(spicedb)
        new.env["SPICEDB_ENDPOINT"] = f"127.0.0.1:{port}"
        new.env["SPICEDB_PRESHARED_KEY"] = key_text
    new.env["SPICEDB_INSECURE"] = "true" if settings.spicedb_insecure else "false"

    new.save(state_dir)
    await prepare_app_db(new.env["DATABASE_URL"], owned=mapping is None)
    if mapping is None:
        await prepare_spicedb(new.env["SPICEDB_ENDPOINT"], new.env["SPICEDB_PRESHARED_KEY"])
    else:
        await wait_for_spicedb(new.env["SPICEDB_ENDPOINT"], new.env["SPICEDB_PRESHARED_KEY"])
    if on_ready is not None:
        # The stack's own connection settings, just written; real environment variables still win.
        await on_ready(Settings(_env_file=state_dir / STACK_ENV_FILE))
    return new


async def _health(component: Component, env: dict[str, str]) -> str:
    try:
        if component.name == "temporal":
            host, _, port = env["TEMPORAL_ADDRESS"].rpartition(":")
            return "healthy" if port_open(host or "127.0.0.1", int(port)) else "down"
        if component.name == "codec":
            port = env["SPICESYNC_CODEC_ENDPOINT"].rpartition(":")[2]
            return "healthy" if port_open("127.0.0.1", int(port)) else "down"
        if component.name == "postgres":
            conn = await asyncpg.connect(env["DATABASE_URL"], timeout=3)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
            return "healthy"
        await asyncio.wait_for(
            wait_for_spicedb(env["SPICEDB_ENDPOINT"], env["SPICEDB_PRESHARED_KEY"], timeout=2), 5
        )
        return "healthy"
    except Exception as err:
        return f"down ({type(err).__name__})"


async def stack_status(settings: Settings) -> tuple[StackState, dict[str, str]]:
    """The recorded stack and each engine's health, probed now."""
    state = StackState.load(settings.state_dir.resolve())
    health = {c.name: await _health(c, state.env) for c in state.components}
    return state, health


async def relay_statuses(settings: Settings) -> list[tuple[RelayRecord, str]]:
    """The relays running beside the stack (``spicesync relay ...``), each probed now."""
    relays = running_relays(settings.state_dir.resolve())
    health = await asyncio.gather(*(relay_health(r) for r in relays))
    return list(zip(relays, health, strict=True))


def stack_down(settings: Settings) -> list[str]:
    """Stop what ``stack up`` started, and nothing else. Data files are kept.

    Returns:
        The names of the components stopped.
    """
    state_dir = settings.state_dir.resolve()
    state = StackState.load(state_dir)
    stopped: list[str] = []
    for component in reversed(state.components):
        if not component.managed:
            continue
        if component.name == "postgres" and component.data_dir:
            stop_embedded_postgres(Path(component.data_dir))
        elif component.pid is not None and pid_alive(component.pid):
            stop_pid(component.pid)
        stopped.append(component.name)
    for name in (_STATE_FILE, STACK_ENV_FILE):
        (state_dir / name).unlink(missing_ok=True)
    return stopped
