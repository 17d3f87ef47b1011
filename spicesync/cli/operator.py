"""``spicesync migrate`` and ``setup-namespace``: what an operator runs once per environment.

What each needs is imported when it runs, so that ``--help`` loads nothing heavy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from spicesync.cli import arguments

if TYPE_CHECKING:
    import asyncpg

    from spicesync.db import MigrationRun
    from spicesync.mapping import FollowMapping
    from spicesync.settings import Settings
    from spicesync.temporal import NamespaceSetup

    Commands = argparse._SubParsersAction[arguments.OneLineErrors]

__all__ = [
    "add_migrate_parser",
    "add_setup_namespace_parser",
    "migrate_command",
    "setup_namespace_command",
]


class _Unreachable(RuntimeError):
    """The App DB did not accept a connection."""


def _refused(command: str, err: Exception | str) -> int:
    print(f"spicesync {command}: {err}", file=sys.stderr)
    return 2


def migrate_command(args: argparse.Namespace) -> int:
    """Apply the App DB migrations (or, ``--dry-run``, list them) and print what happened."""
    import asyncpg

    from spicesync.db import MigrationRefused, migrate
    from spicesync.mapping import MappingError
    from spicesync.settings import load_settings
    from workers.cdc_slot import CdcNotReady

    settings = load_settings()
    url = settings.require_database_url()
    try:
        mapping = settings.follow_mapping()
    except MappingError as err:
        return _refused("migrate", err)
    # Follow mode: the application owns its users table, so only spicesync_* migrations run.
    mode = "owned mode" if mapping is None else f"follow mode ({settings.mapping_path()})"
    if args.cdc and mapping is None:
        return _refused("migrate", "--cdc follows a mapped table: set SPICESYNC_CONFIG")
    cdc_lines: list[str] = []

    async def run() -> MigrationRun:
        try:
            conn = await asyncpg.connect(url, timeout=10)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            # asyncpg names host and database, never the URL (which may hold a password).
            problem = f"cannot connect to PostgreSQL: {type(err).__name__}: {err}"
            raise _Unreachable(problem) from err
        try:
            run = await migrate(conn, owned=mapping is None, dry_run=args.dry_run)
            if args.cdc and mapping is not None and not args.dry_run:
                cdc_lines.extend(await _prepare_cdc(conn, settings, mapping))
            return run
        finally:
            await conn.close()

    try:
        outcome = asyncio.run(run())
    except MigrationRefused as err:
        return _refused("migrate", f"refused, nothing applied: {err}")
    except _Unreachable as err:
        return _refused("migrate", err)
    except CdcNotReady as err:
        return _refused("migrate", f"migrations applied, but --cdc: {err}")
    print("\n".join([_migrate_report(outcome, mode), *cdc_lines]))
    return 0


async def _prepare_cdc(
    conn: asyncpg.Connection, settings: Settings, mapping: FollowMapping
) -> list[str]:
    """Create the CDC relay's publication and slot (``migrate --cdc``); what was done."""
    from workers.cdc_slot import check_source, ensure_publication, ensure_slot

    oid = await check_source(conn, mapping)
    publication, slot = settings.cdc_publication, settings.cdc_slot
    made = await ensure_publication(conn, publication, mapping, oid)
    state = await ensure_slot(conn, slot, publication)
    return [
        f"{'created' if made else 'kept'} publication {publication} of {mapping.source.table}",
        f"{'created' if state.created else 'kept'} replication slot {slot}"
        + (" (it had been lost: the relay starts a reconcile)" if state.lost else ""),
    ]


def _migrate_report(run: MigrationRun, mode: str) -> str:
    verb = "would apply" if run.dry_run else "applied"
    lines = [f"{mode}: {run.applied_before} migrations applied before this run"]
    lines += [f"{verb} {m.label}" for m in run.pending]
    if run.checksums_recorded:
        versions = ", ".join(f"{v:04d}" for v in run.checksums_recorded)
        lines.append(
            f"{'would record' if run.dry_run else 'recorded'} the checksums of {versions}"
            " (applied before checksums were kept)"
        )
    if not run.pending:
        lines.append("nothing to apply: the database is up to date")
    return "\n".join(lines)


def setup_namespace_command(args: argparse.Namespace) -> int:
    """Register the search attributes and print the dynamic config the cluster needs."""
    from spicesync.settings import load_settings
    from spicesync.temporal import NamespaceNotSetUp, connect_temporal, register_search_attributes

    settings = load_settings()

    async def run() -> NamespaceSetup:
        client = await connect_temporal(settings)
        return await register_search_attributes(client, dry_run=args.dry_run)

    try:
        setup = asyncio.run(run())
    except NamespaceNotSetUp as err:
        return _refused("setup-namespace", err)
    print(_namespace_report(setup))
    return 0


def _namespace_report(setup: NamespaceSetup) -> str:
    from spicesync.constants import SEARCH_ATTRIBUTES, TEMPORAL_DYNAMIC_CONFIG, dynamic_config_value

    added = "would add" if setup.dry_run else "added"
    lines = [f"namespace {setup.namespace}: search attributes"]
    for name, kind in SEARCH_ATTRIBUTES.items():
        lines.append(f"  {name:<22} {kind:<9} {added if name in setup.added else 'present'}")
    lines += [
        "",
        "# Dynamic config spicesync needs, for the Temporal server's dynamic config file (no API",
        "# sets it; Temporal Cloud: ask support). Without it a burst of events for one user is",
        "# refused past 10 waiting callers, and first activities wait for a poll:",
    ]
    for key, value in TEMPORAL_DYNAMIC_CONFIG.items():
        lines += [
            f"{key}:",
            f"  - value: {dynamic_config_value(value)}",
            "    constraints:",
            f"      namespace: {setup.namespace}",
        ]
    return "\n".join(lines)


def add_migrate_parser(commands: Commands) -> None:
    """Add ``migrate``."""
    migrate = commands.add_parser(
        "migrate",
        help="apply the App DB migrations once per environment (--dry-run lists them)",
    )
    migrate.add_argument(
        "--dry-run", action="store_true", help="list what would be applied; change nothing"
    )
    migrate.add_argument(
        "--cdc",
        action="store_true",
        help="follow mode: also create `relay cdc`'s publication and replication slot (a slot"
        " keeps WAL until the relay reads it: only when the relay will run)",
    )
    migrate.set_defaults(func=migrate_command)


def add_setup_namespace_parser(commands: Commands) -> None:
    """Add ``setup-namespace``."""
    setup = commands.add_parser(
        "setup-namespace",
        help="register the search attributes on the Temporal namespace; print the dynamic"
        " config it needs",
    )
    setup.add_argument(
        "--dry-run", action="store_true", help="list what would be registered; change nothing"
    )
    setup.set_defaults(func=setup_namespace_command)
