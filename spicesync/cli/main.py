"""``spicesync``: run the stack, the worker, the demo, and start syncs by hand.

The CLI is the one part of the shared package that reaches up into ``workers``, ``starters``,
``bench`` and ``chaos``, and it does so inside the command that needs them: parsing (and
``--help``) loads only the standard library and a few small modules, so every command starts
at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from chaos.catalogue import SCENARIO_SUMMARIES
from spicesync import __version__
from spicesync.cli import arguments
from spicesync.cli.maintenance import (
    backfill_command,
    bench_command,
    chaos_command,
    reconcile_command,
)
from spicesync.cli.operator import add_migrate_parser, add_setup_namespace_parser
from spicesync.cli.progress import note, waiting
from spicesync.limits import (
    BACKFILL_BATCH_SIZE_MAX,
    BACKFILL_LANES_MAX,
    RECONCILE_PAGE_SIZE_MAX,
    SCHEDULE_INTERVAL_SECONDS_MAX,
    SCHEDULE_INTERVAL_SECONDS_MIN,
)

if TYPE_CHECKING:
    from pydantic import ValidationError

    from spicesync.settings import Settings

    # What add_subparsers returns: each command adds its own parser to it.
    Commands = argparse._SubParsersAction[arguments.OneLineErrors]

__all__ = ["build_parser", "entry", "main"]


def load_settings() -> Settings:
    """The settings, from the environment and the local stack's ``stack.env``.

    Imported when a command runs, not at start: the settings module loads the Temporal SDK.
    """
    from spicesync.settings import load_settings as load

    return load()


def _stack(args: argparse.Namespace) -> int:
    from spicesync.stack.manager import (
        printable_env,
        relay_statuses,
        stack_down,
        stack_status,
        stack_up,
    )

    settings = load_settings()
    if args.action == "up":
        from starters.reconcile import schedule_as_configured

        state = asyncio.run(stack_up(settings, on_ready=schedule_as_configured))
        print("\n".join(printable_env(state.env, show_secrets=args.show_secrets)))
        return 0
    if args.action == "down":
        stopped = stack_down(settings)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing (no stack recorded)"))
        return 0
    if args.action == "env":
        from spicesync.stack.manager import StackState

        state = StackState.load(settings.state_dir.resolve())
        if not state.env:
            print("# no stack recorded; run `spicesync stack up`", file=sys.stderr)
            return 1
        print("\n".join(printable_env(state.env, show_secrets=args.show_secrets)))
        return 0
    state, health = asyncio.run(stack_status(settings))
    if not state.components:
        print("# no stack recorded; run `spicesync stack up`")
        return 1
    print("\n".join(printable_env(state.env, show_secrets=args.show_secrets)))
    for c in state.components:
        where = f" pid={c.pid}" if c.pid else ""
        log = f" log={c.log}" if c.log else ""
        print(f"# {c.name:<8} {health[c.name]:<10} {c.label}{where}{log}")
    relays = asyncio.run(relay_statuses(settings))
    for relay, said in relays:
        addresses = {"health": relay.health_address, "metrics": relay.metrics_address}
        endpoints = "".join(f" {name}={where}" for name, where in addresses.items() if where)
        print(f"# relay   {said:<10} {relay.feed} pid={relay.pid}{endpoints}")
    healthy = ("healthy", "running")
    return (
        0
        if all(h == "healthy" for h in health.values())
        and all(said in healthy for _, said in relays)
        else 1
    )


def _worker(_args: argparse.Namespace) -> int:
    from spicesync.logs import configure_logging
    from spicesync.mapping import MappingError
    from spicesync.temporal import TemporalUnreachable
    from workers.worker import SpiceDBKeyRefused, WorkerNotStarted, run_worker

    configure_logging()
    try:
        asyncio.run(run_worker(load_settings()))
    except (SpiceDBKeyRefused, WorkerNotStarted, TemporalUnreachable, MappingError) as err:
        # One line, whatever the number of problems (a mapping may have several).
        reason = "; ".join(str(err).splitlines())
        logging.getLogger("spicesync.worker").error("not starting: %s", reason)
        return 2
    return 0


def _relay(args: argparse.Namespace) -> int:
    from spicesync.logs import configure_logging
    from spicesync.mapping import MappingError
    from workers.cdc_relay import run_cdc_relay
    from workers.nats_relay import run_nats_relay
    from workers.outbox_relay import run_outbox_relay
    from workers.relay_support import RelayNotStarted

    configure_logging()
    runs = {"cdc": run_cdc_relay, "nats": run_nats_relay}
    run = runs.get(args.feed, run_outbox_relay)
    try:
        asyncio.run(run(load_settings()))
    except (RelayNotStarted, MappingError) as err:
        reason = "; ".join(str(err).splitlines())
        # At start, or later (a NATS consumer gone that may not be created again).
        logging.getLogger("spicesync.relay").error("relay cannot run: %s", reason)
        return 2
    return 0


# Every line `spicesync users` prints has these keys, whatever became of the event.
_USERS_FIELDS = (
    "user_id",
    "workflow_id",
    "event_id",
    "version",
    "status",
    "zed_token",
    "error",
    "message",
)
_WAITING_FOR = {
    "start": "Temporal to accept the event",
    "accepted": "Temporal to accept the change",
    "applied": "a sync of the row as it is now",
    "row": "the App DB row",
    "permissions": "the App DB row and SpiceDB's permissions",
}


def _users_line(**fields: object) -> str:
    return json.dumps({key: fields.get(key) for key in _USERS_FIELDS})


def _user_changed(args: argparse.Namespace) -> int:
    """``users changed``: follow mode's "this user's row changed"."""
    from spicesync.client import ChangeNotAccepted, FollowSyncFailed, user_changed
    from spicesync.constants import followed_user_workflow_id

    common = {"user_id": args.user_id, "workflow_id": followed_user_workflow_id(args.user_id)}
    try:
        outcome = asyncio.run(
            waiting(
                user_changed(args.user_id, args.version, wait=args.wait),
                lambda seconds: (
                    f"spicesync users: waiting for {_WAITING_FOR[args.wait]}"
                    f" ({seconds:.0f} s; a `spicesync worker` must be running)"
                ),
            )
        )
    except FollowSyncFailed as err:
        failed = err.outcome
        print(
            _users_line(
                **common,
                version=args.version,
                status="failed",
                error=failed.error_type,
                message=failed.message,
            )
        )
        return 1
    except ChangeNotAccepted as err:
        print(
            _users_line(
                **common,
                version=args.version,
                status="not_accepted",
                error="ChangeNotAccepted",
                message=err.last_error,
            )
        )
        return 1
    status = "accepted" if args.wait == "accepted" else outcome.status
    version = outcome.version if outcome.version is not None else args.version
    print(_users_line(**common, version=version, status=status, zed_token=outcome.zed_token))
    return 0


def _users(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from spicesync.errors import EventIdConflict, InvalidUserInput
    from spicesync.models import CreateUserInput
    from starters.user_events import (
        EventNotAccepted,
        UserSyncFailed,
        WaitFor,
        change_role,
        create_user,
        delete_user,
        move_user,
    )

    wait = WaitFor(args.wait)
    common = {"event_id": args.event_id, "wait": wait}
    user_id = args.user_id or str(uuid.uuid4())
    try:
        if args.users_command == "create":
            user = CreateUserInput(
                user_id=user_id,
                email=args.email,
                name=args.name,
                org_id=args.org,
                role=args.role,
            )
            run = create_user(user, version=args.version, **common)
        elif args.users_command == "update":
            run = change_role(
                user_id, org_id=args.org, role=args.role, version=args.version, **common
            )
        elif args.users_command == "move":
            run = move_user(
                user_id, org_id=args.org, role=args.role, version=args.version, **common
            )
        else:
            run = delete_user(user_id, version=args.version, **common)
        outcome = asyncio.run(
            waiting(
                run,
                lambda seconds: (
                    f"spicesync users: waiting for {_WAITING_FOR[args.wait]}"
                    f" ({seconds:.0f} s; a `spicesync worker` must be running)"
                ),
            )
        )
    except (InvalidUserInput, ValidationError) as err:
        message = err.message if isinstance(err, InvalidUserInput) else str(err)
        print(
            _users_line(
                user_id=user_id,
                # Nothing was started: the event id is known only if the caller chose it.
                event_id=args.event_id,
                version=args.version,
                status="rejected",
                error="InvalidUserInput",
                message=message,
            )
        )
        return 2
    except EventIdConflict as err:
        print(
            _users_line(
                user_id=err.user_id,
                event_id=err.event_id,
                version=args.version,
                status="conflict",
                error="EventIdConflict",
                message=err.message,
            )
        )
        return 1
    except UserSyncFailed as err:
        print(
            _users_line(
                user_id=user_id,
                workflow_id=err.workflow_id,
                event_id=err.event_id,
                version=args.version,
                status="failed",
                error=err.error_type,
                message=err.message,
            )
        )
        return 1
    except EventNotAccepted as err:
        print(
            _users_line(
                user_id=user_id,
                workflow_id=err.workflow_id,
                event_id=err.event_id,
                version=args.version,
                status="not_accepted",
                error="EventNotAccepted",
                message=err.last_error,
            )
        )
        return 1
    print(_users_line(**outcome.model_dump()))
    return 0


def _stuck(args: argparse.Namespace) -> int:
    from spicesync.db import create_pool
    from spicesync.temporal import connect_temporal
    from starters.stuck import (
        StuckSync,
        find_failed_followed,
        find_stuck,
        find_unfinished,
        parse_duration,
    )

    async def run() -> list[StuckSync]:
        settings = load_settings()
        older_than = parse_duration(args.older_than)
        client = await connect_temporal(settings)
        stuck = await find_stuck(client, older_than=older_than)
        if settings.database_url is None:
            return stuck
        pool = await create_pool(settings.database_url, min_size=1, max_size=4)
        try:
            # Follow mode has no `users` table of spicesync's: its failed users are in the
            # bookkeeping (a table both modes have).
            if settings.mapping_path() is None:
                stuck += await find_unfinished(client, pool, older_than=older_than)
            return stuck + await find_failed_followed(pool, older_than=older_than)
        finally:
            await pool.close()

    stuck = asyncio.run(run())
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in stuck]))
        return 0
    if not stuck:
        print(f"no sync has been stuck for more than {args.older_than}")
        return 0
    print(f"{'user id':<36}  {'stage':<20} {'age':>8}  {'attempt':>7}  last error")
    for s in stuck:
        age = f"{s.age_seconds / 60:.1f}m"
        error = (s.last_error or "").replace("\n", " ")[:100]
        print(f"{s.user_id:<36}  {s.stage:<20} {age:>8}  {s.attempt:>7}  {error}")
    return 0


def _repair(args: argparse.Namespace) -> int:
    from spicesync.temporal import connect_temporal
    from starters import repair

    followed = args.followed_user_id is not None
    user_id = args.followed_user_id if followed else args.user_id

    async def run() -> dict[str, object]:
        client = await connect_temporal(load_settings())
        if args.action == "retry":
            return {"reset_activities": await repair.retry_now(client, user_id, followed=followed)}
        if args.action == "rollback":
            status = await repair.rollback(client, user_id, followed=followed)
            return {"status": status.name if status else None}
        return {"resumed": await repair.resume(client, user_id, followed=followed)}

    print(json.dumps({"user_id": user_id, "action": args.action, **asyncio.run(run())}))
    return 0


def _codec_server(args: argparse.Namespace) -> int:
    from spicesync.codec_server import CodecAuth, CodecServer
    from spicesync.logs import configure_logging
    from spicesync.settings import (
        PLAINTEXT_OPT_OUT,
        PLAINTEXT_OPT_OUT_VALUE,
        MissingSetting,
        UnsafeSetting,
        is_loopback,
    )

    settings = load_settings()
    codec = settings.codec()
    if codec is None:
        raise MissingSetting(
            "SPICESYNC_ENCRYPTION_KEYS is not set: the codec server needs the keys"
        )
    if settings.codec_token is None and not settings.codec_jwks_url:
        raise MissingSetting(
            "SPICESYNC_CODEC_TOKEN or SPICESYNC_CODEC_JWKS_URL must be set: the codec server"
            " decrypts for authenticated callers only"
        )
    try:
        origins = args.ui_origin or [arguments.origin(o) for o in settings.codec_origins()]
    except argparse.ArgumentTypeError as err:
        raise MissingSetting(f"SPICESYNC_CODEC_UI_ORIGINS: {err}") from err
    auth = CodecAuth(
        token=settings.codec_token.get_secret_value() if settings.codec_token else None,
        jwks_url=settings.codec_jwks_url,
        audience=settings.codec_jwt_audience,
        issuer=settings.codec_jwt_issuer,
        algorithms=tuple(a.strip() for a in settings.codec_jwt_algorithms.split(",") if a.strip()),
    )
    tls = None
    if settings.codec_tls_cert and settings.codec_tls_key:
        tls = (settings.codec_tls_cert, settings.codec_tls_key)
    elif settings.environment == "production" and not is_loopback(args.host):
        problem = (
            f"SPICESYNC_CODEC_TLS_CERT and SPICESYNC_CODEC_TLS_KEY are not set and --host"
            f" {args.host} is not this machine: tokens and decrypted payloads would cross the"
            " network in clear"
        )
        if settings.allow_plaintext_in_production != PLAINTEXT_OPT_OUT_VALUE:
            raise UnsafeSetting(problem)
        logging.getLogger("spicesync.codec_server").warning(
            "%s is set: %s", PLAINTEXT_OPT_OUT, problem
        )
    port = settings.stack_codec_port if args.port is None else args.port
    configure_logging()  # the access log: JSON lines on stderr
    try:
        server = CodecServer(
            codec,
            host=args.host,
            port=port,
            allowed_origins=origins,
            auth=auth,
            allow_encode=settings.codec_allow_encode,
            tls=tls,
        )
    except OSError as err:  # an unknown host, a port in use or not ours to take
        print(
            f"spicesync codec-server: cannot listen on --host {args.host} --port {port}:"
            f" {err.strerror or err}",
            file=sys.stderr,
        )
        return 2
    accepts = [name for name, on in (("token", auth.token), ("JWT", auth.jwks_url)) if on]
    encode = "on" if settings.codec_allow_encode else "off"
    print(
        f"codec server on {server.scheme}://{args.host}:{server.port} for {', '.join(origins)};"
        f" accepts {' and '.join(accepts)}; /encode {encode}",
        flush=True,
    )
    # uvicorn stops gracefully on SIGINT and SIGTERM (it installs its handlers in this thread).
    server.serve_forever()
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.follow:
        from spicesync.cli.follow_demo import follow_summary, run_follow_demo

        follow_report = asyncio.run(run_follow_demo(args.users, progress=note))
        print(follow_summary(follow_report))
        return 0 if follow_report.ok else 1
    from spicesync.cli.demo import run_demo, summary

    report = asyncio.run(run_demo(args.users, progress=note))
    print(summary(report, load_settings().temporal_ui_url))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (each has ``--help``)."""
    parser = arguments.OneLineErrors(
        prog="spicesync",
        description="Keep PostgreSQL users and SpiceDB relationships in sync with Temporal.",
    )
    parser.add_argument("--version", action="version", version=f"spicesync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_stack_parser(commands)
    add_migrate_parser(commands)
    add_setup_namespace_parser(commands)
    _add_worker_parser(commands)
    _add_relay_parser(commands)
    _add_users_parser(commands)
    _add_stuck_parser(commands)
    _add_repair_parser(commands)
    _add_codec_server_parser(commands)
    _add_reconcile_parser(commands)
    _add_backfill_parser(commands)
    _add_bench_parser(commands)
    _add_chaos_parser(commands)
    _add_demo_parser(commands)
    return parser


def _add_stack_parser(commands: Commands) -> None:
    """Add ``stack up | status | env | down``."""
    stack = commands.add_parser("stack", help="run the local Temporal, PostgreSQL and SpiceDB")
    stack.add_argument(
        "action",
        choices=["up", "status", "env", "down"],
        help="up: start what is missing and print KEY=value settings; status: settings and"
        " health; env: the settings only; down: stop what up started",
    )
    stack.add_argument(
        "--show-secrets",
        action="store_true",
        help="print the preshared key, encryption keys and codec token too (for scripts;"
        " hidden by default)",
    )
    stack.set_defaults(func=_stack)


def _add_worker_parser(commands: Commands) -> None:
    """Add ``worker``."""
    worker = commands.add_parser("worker", help="run a worker until SIGINT/SIGTERM")
    worker.set_defaults(func=_worker)


def _add_relay_parser(commands: Commands) -> None:
    """Add ``relay outbox``, ``relay cdc`` and ``relay nats``."""
    relay = commands.add_parser(
        "relay", help="deliver an application's changes to the followed users' workflows"
    )
    feeds = relay.add_subparsers(dest="feed", required=True, metavar="FEED")
    outbox = feeds.add_parser(
        "outbox",
        help="relay spicesync_outbox rows (follow mode) until SIGINT/SIGTERM; several may run",
        description="Claim spicesync_outbox rows in batches (FOR UPDATE SKIP LOCKED), deliver one"
        " change per user to its workflow, delete the rows once Temporal accepted them. Tuned by"
        " SPICESYNC_OUTBOX_BATCH_SIZE, _CONCURRENCY, _POLL_SECONDS, _RPC_TIMEOUT_SECONDS and"
        " _METRICS_ADDRESS (docs/follow-mode.md#outbox).",
    )
    outbox.set_defaults(func=_relay)
    cdc = feeds.add_parser(
        "cdc",
        help="follow the mapped table through PostgreSQL logical replication (follow mode) until"
        " SIGINT/SIGTERM; the app changes nothing",
        description="Read the mapped table's committed inserts, updates and deletes from a logical"
        " replication slot (pgoutput), deliver one change per user to its workflow, and confirm"
        " the slot only once Temporal accepted them. Needs wal_level = logical. Tuned by"
        " SPICESYNC_CDC_SLOT, _PUBLICATION, _BATCH_SIZE, _CONCURRENCY, _POLL_SECONDS,"
        " _RPC_TIMEOUT_SECONDS, _LAG_WARN_BYTES, _METRICS_ADDRESS and _HEALTH_ADDRESS"
        " (docs/follow-mode.md#change-data-capture).",
    )
    cdc.set_defaults(func=_relay)
    feed = feeds.add_parser(
        "nats",
        help="relay NATS JetStream messages (follow mode) until SIGINT/SIGTERM",
        description="Pull batches from a durable JetStream consumer, deliver one change per user"
        " named by a user.created-style event or a Debezium change event, ACK once Temporal"
        " accepted it, TERMinate what names no user. Configured by SPICESYNC_NATS_URL, _STREAM,"
        " _SUBJECTS, _DURABLE, _CREATE, credentials and TLS (docs/follow-mode.md#nats-jetstream).",
    )
    feed.set_defaults(func=_relay)


def _add_users_parser(commands: Commands) -> None:
    """Add ``users create | update | move | delete | changed``."""
    users = commands.add_parser(
        "users", help="deliver user lifecycle events as an application would"
    )
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    create = user_commands.add_parser("create", help="create a user in the App DB and SpiceDB")
    create.add_argument("--email", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--org", required=True, help="organization id")
    create.add_argument("--role", default="member", choices=["member", "admin"])
    create.add_argument("--user-id", help="the user's UUID (default: a new one); reuse to retry")
    update = user_commands.add_parser("update", help="change a user's role")
    move = user_commands.add_parser("move", help="move a user to another organization")
    delete = user_commands.add_parser(
        "delete", help="revoke a user's permissions, then delete the row"
    )
    for changer in (update, move):
        changer.add_argument("--user-id", required=True)
        changer.add_argument("--org", required=True, help="the organization after the change")
        changer.add_argument(
            "--role", required=True, choices=["member", "admin"], help="the role after the change"
        )
    delete.add_argument("--user-id", required=True)
    for sub, default_version in ((create, 1), (update, None), (move, None), (delete, None)):
        _add_event_options(sub, default_version)
    changed = user_commands.add_parser(
        "changed",
        help="follow mode: the user's row in the application's table changed (or was deleted)",
    )
    changed.add_argument(
        "--user-id",
        required=True,
        type=arguments.followed_user_id,
        help="the user's id as the mapping's id column holds it",
    )
    changed.add_argument(
        "--version",
        type=arguments.integer(0),
        help="the row's version after the change, if the mapping names a version column",
    )
    changed.add_argument(
        "--wait",
        default="applied",
        choices=["accepted", "applied"],
        help="return once Temporal holds the change, or once a sync of the row as it is now"
        " has finished (default; prints its ZedToken)",
    )
    changed.set_defaults(func=_user_changed)


def _add_event_options(sub: argparse.ArgumentParser, default_version: int | None) -> None:
    """Add what every ``users`` action takes: the version, the event id, what to wait for."""
    sub.add_argument(
        "--version",
        type=arguments.integer(1),
        default=default_version,
        required=default_version is None,
        help="the user's version in the App DB after this change (monotonic per user)",
    )
    sub.add_argument(
        "--event-id", help="idempotency key (default: derived from user, kind, version)"
    )
    sub.add_argument(
        "--wait",
        default="permissions",
        choices=["start", "accepted", "row", "permissions"],
        help="return once Temporal holds the event, once the user's workflow has taken it"
        " (checked against earlier deliveries), once the row reflects it, or once SpiceDB does"
        " too",
    )
    sub.set_defaults(func=_users)


def _add_stuck_parser(commands: Commands) -> None:
    """Add ``stuck``."""
    stuck = commands.add_parser(
        "stuck", help="list syncs stuck in a stage (from Temporal's visibility and describe)"
    )
    stuck.add_argument(
        "--older-than",
        default="5m",
        type=arguments.duration,
        help="e.g. 30s, 5m, 2h, 1d (default 5m)",
    )
    stuck.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stuck.set_defaults(func=_stuck)


def _add_repair_parser(commands: Commands) -> None:
    """Add ``repair retry | rollback | resume``."""
    repair_cmd = commands.add_parser("repair", help="retry now, roll back or resume a user's sync")
    repair_cmd.add_argument(
        "action",
        choices=["retry", "rollback", "resume"],
        help="retry: reset the retrying activity's backoff; rollback: cancel and compensate;"
        " resume: continue a sync parked on a schema mismatch",
    )
    who = repair_cmd.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", type=arguments.user_id, help="a user's UUID (owned mode)")
    who.add_argument(
        "--followed-user-id",
        type=arguments.followed_user_id,
        help="a followed user's id (follow mode; rollback only stops the sync in flight)",
    )
    repair_cmd.set_defaults(func=_repair)


def _add_codec_server_parser(commands: Commands) -> None:
    """Add ``codec-server``."""
    codec = commands.add_parser(
        "codec-server", help="decrypt payloads for the Temporal UI (operators only)"
    )
    codec.add_argument("--host", default="127.0.0.1")
    codec.add_argument(
        "--port", type=arguments.port, help="default: SPICESYNC_CODEC_PORT (8081); 0: any free"
    )
    codec.add_argument(
        "--ui-origin",
        action="append",
        type=arguments.origin,
        help="an origin allowed to call it (CORS); repeatable; default: the local Temporal UI",
    )
    codec.set_defaults(func=_codec_server)


def _add_reconcile_parser(commands: Commands) -> None:
    """Add ``reconcile``."""
    reconcile = commands.add_parser(
        "reconcile",
        help="find drift between the App DB and SpiceDB and repair it (dry run by default)",
    )
    mode = reconcile.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run", action="store_true", help="report only, change nothing (the default)"
    )
    mode.add_argument("--apply", action="store_true", help="repair what is found")
    reconcile.add_argument(
        "--prune-cap",
        type=arguments.integer(0),
        help="most relationships one run may delete (default SPICESYNC_RECONCILE_PRUNE_CAP, 1000)",
    )
    reconcile.add_argument(
        "--page-size",
        type=arguments.integer(1, RECONCILE_PAGE_SIZE_MAX),
        default=RECONCILE_PAGE_SIZE_MAX,
        help=f"rows per scanned page (1 to {RECONCILE_PAGE_SIZE_MAX}, the default)",
    )
    reconcile.add_argument(
        "--schedule-every",
        type=arguments.number(SCHEDULE_INTERVAL_SECONDS_MIN, SCHEDULE_INTERVAL_SECONDS_MAX),
        metavar="SECONDS",
        help="instead of running now, create or update the Temporal Schedule that runs it"
        f" (at least {SCHEDULE_INTERVAL_SECONDS_MIN:g} s)",
    )
    reconcile.add_argument("--json", action="store_true", help="print the report as JSON")
    reconcile.set_defaults(func=reconcile_command)


def _add_backfill_parser(commands: Commands) -> None:
    """Add ``backfill``."""
    backfill = commands.add_parser(
        "backfill", help="write every App DB user spicesync has never written into SpiceDB"
    )
    backfill.add_argument(
        "--batch-size",
        type=arguments.integer(1, BACKFILL_BATCH_SIZE_MAX),
        default=BACKFILL_BATCH_SIZE_MAX,
        help=(
            f"users per write (1 to {BACKFILL_BATCH_SIZE_MAX}, the default; at most half as many"
            " while version markers are written)"
        ),
    )
    backfill.add_argument(
        "--max-rate",
        type=arguments.number(0),
        default=0.0,
        help="users per second at most (default 0: no limit)",
    )
    backfill.add_argument(
        "--lanes",
        type=arguments.integer(1, BACKFILL_LANES_MAX),
        default=2,
        help=f"id ranges written side by side (1 to {BACKFILL_LANES_MAX}; default 2)",
    )
    backfill.add_argument("--json", action="store_true", help="print the figures as JSON")
    backfill.set_defaults(func=backfill_command)


def _add_bench_parser(commands: Commands) -> None:
    """Add ``bench``."""
    bench = commands.add_parser(
        "bench",
        help="measure spicesync (owned mode, and follow mode fed by its outbox or NATS relay)"
        " beside the empty-workflow ceiling, a dual write, a NATS JetStream sync and a naive"
        " outbox relay (open loop); write a table, JSON and a plot",
    )
    bench.add_argument(
        "--quick", action="store_true", help="one low rate, a few seconds, 2,000-user backfill"
    )
    bench.add_argument(
        "--rates",
        type=arguments.number(0, low_included=False),
        nargs="+",
        help="offered rates, users/s",
    )
    bench.add_argument(
        "--seconds", type=arguments.number(0, low_included=False), help="seconds of load per rate"
    )
    bench.add_argument(
        "--backfill-users", type=arguments.integer(1), help="users in the backfill comparison"
    )
    bench.add_argument("--out", default=".spicesync/bench", help="output folder")
    bench.add_argument(
        "--systems", nargs="+", metavar="NAME", help="only these systems (by name, e.g. spicesync)"
    )
    bench.add_argument(
        "--nats-url",
        type=arguments.nats_url,
        help="an existing NATS with JetStream (default: start one of its own)",
    )
    bench.set_defaults(func=bench_command)


def _add_chaos_parser(commands: Commands) -> None:
    """Add ``chaos``."""
    chaos = commands.add_parser(
        "chaos",
        help="drive load through the real stack while injecting faults, then check that no"
        " user was lost, half-written or duplicated; write a table (markdown, JSON)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios (all run by default):\n"
        + "\n".join(f"  {name:<34} {what}" for name, what in SCENARIO_SUMMARIES.items()),
    )
    chaos.add_argument(
        "--users",
        type=arguments.integer(1),
        default=1000,
        help="users per scenario (default 1000; CI runs 100)",
    )
    chaos.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIO_SUMMARIES),
        metavar="NAME",
        help="run only this scenario (repeatable; listed below); default: all",
    )
    chaos.add_argument(
        "--outage-seconds",
        type=arguments.number(0, low_included=False),
        default=30.0,
        help="how long PostgreSQL or SpiceDB stays unreachable (default 30)",
    )
    chaos.add_argument("--out", default=".spicesync/chaos", help="output folder")
    chaos.set_defaults(func=chaos_command)


def _add_demo_parser(commands: Commands) -> None:
    """Add ``demo``."""
    demo = commands.add_parser(
        "demo", help="bring the stack up, create users, verify them in both stores"
    )
    demo.add_argument(
        "--users",
        type=arguments.integer(1),
        default=100,
        help="valid users to create (default 100)",
    )
    demo.add_argument(
        "--follow",
        action="store_true",
        help="follow mode: an application's own table, written with plain SQL and the outbox,"
        " followed through a mapping (examples/follow/)",
    )
    demo.set_defaults(func=_demo)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spicesync`` console script."""
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from spicesync.mapping import MappingError
    from spicesync.settings import MissingSetting
    from spicesync.temporal import TemporalUnreachable

    provider = None
    try:
        if args.command in ("worker", "relay", "users", "demo"):
            from spicesync.telemetry import configure_tracing

            provider = configure_tracing(f"spicesync-{args.command}", load_settings().trace_path())
        return int(args.func(args))
    except (MissingSetting, TemporalUnreachable, MappingError) as err:
        print(f"spicesync: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:
        if err.title != "Settings":
            raise  # a bug, not the environment: keep its traceback
        print(f"spicesync: invalid settings: {_settings_problems(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if provider is not None:
            provider.shutdown()  # flush the last spans


def _settings_problems(err: ValidationError) -> str:
    """One line naming each setting that is wrong and why; never the value (it may be a key).

    The settings hide their inputs in errors, and only ``loc`` (the variable's name) and
    ``msg`` are used here, so neither a value nor pydantic's ``input_value`` can reach it.
    """
    problems = []
    for e in err.errors(include_url=False, include_input=False):
        name = ".".join(str(part) for part in e["loc"])
        message = str(e["msg"]).removeprefix("Value error, ")
        problems.append(f"{name}: {message}" if name else message)
    return "; ".join(problems)


def entry() -> None:
    """Console-script entry: run :func:`main`, then leave without interpreter finalisation.

    gRPC and the Temporal SDK's core keep native threads that can crash the interpreter while it
    finalises (``Fatal Python error: PyGILState_Release``), turning a successful command into
    exit status -6. Every client and worker is closed by then, so flushing and leaving at once
    keeps the exit status truthful.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
