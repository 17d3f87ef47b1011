"""Names shared by workers, starters, the stack and the tests, kept in one place."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Final

from temporalio.common import SearchAttributeKey

__all__ = [
    "ACTIVE_STAGES",
    "ACTIVITY_START_TO_CLOSE",
    "BACKFILL_WORKFLOW_ID",
    "CDC_HEARTBEAT_BYTES",
    "CDC_RECONCILE_WORKFLOW_PREFIX",
    "DEFAULT_TASK_QUEUE",
    "DELIVER_EVENT_SIGNAL",
    "EVENTS_PER_RUN",
    "FOLLOWED_USER_WORKFLOW",
    "FOLLOWED_USER_WORKFLOW_ID_PREFIX",
    "HELD_CHANGE_GRACE",
    "LOCAL_STEP_TIMEOUT",
    "MAX_IN_FLIGHT_UPDATES",
    "NATS_ACK_WAIT_SECONDS",
    "NATS_FETCH_SECONDS",
    "ORG_ID_ATTRIBUTE",
    "OUTBOX_CHANNEL",
    "RECONCILE_SCHEDULE_ID",
    "RECONCILE_WORKFLOW_ID",
    "SEARCH_ATTRIBUTES",
    "SPICEDB_CALL_TIMEOUT_SECONDS",
    "SUBMIT_EVENT_UPDATE",
    "SYNC_CHANGE_UPDATE",
    "TEMPORAL_DYNAMIC_CONFIG",
    "USER_CHANGED_SIGNAL",
    "USER_ID_ATTRIBUTE",
    "USER_SYNC_WORKFLOW",
    "USER_WORKFLOW_ID_PREFIX",
    "dev_server_dynamic_config",
    "dynamic_config_value",
    "followed_user_workflow_id",
    "user_workflow_id",
]

DEFAULT_TASK_QUEUE: Final = "spicesync-users"

# `spicesync relay nats`: how long JetStream waits for a delivered message's ack before it
# delivers the message again (the consumer's AckWait, when the relay creates it; NATS's own
# default), and how long one pull waits for messages (a long poll: it returns as soon as any
# arrive; a short one can expire while messages are on their way, delaying them by AckWait).
NATS_ACK_WAIT_SECONDS: Final = 30.0
NATS_FETCH_SECONDS: Final = 5.0

USER_WORKFLOW_ID_PREFIX: Final = "user-"

# The user's workflow and its event update, by the names Temporal knows them: the client
# (spicesync.client) addresses them by name so that an application needs no workflow code.
USER_SYNC_WORKFLOW: Final = "UserSyncWorkflow"
SUBMIT_EVENT_UPDATE: Final = "submit"
# ``WaitFor.START`` delivers an event with signal-with-start instead: durable once the server
# answers, so a busy worker never holds up the application's request.
DELIVER_EVENT_SIGNAL: Final = "deliver"

# Follow mode (docs/follow-mode.md): one workflow per followed user of the application's own table.
# ``user_changed`` is a signal, so delivering a change (signal-with-start) is durable as soon as
# the server answers, without waiting for a worker; ``sync_change`` is the update a caller uses
# to wait until a sync that began after its change has finished.
FOLLOWED_USER_WORKFLOW: Final = "FollowedUserWorkflow"
FOLLOWED_USER_WORKFLOW_ID_PREFIX: Final = "followed-user-"
USER_CHANGED_SIGNAL: Final = "user_changed"
SYNC_CHANGE_UPDATE: Final = "sync_change"
# The outbox's insert trigger notifies this channel; relays LISTEN on it (polling is the fallback).
OUTBOX_CHANNEL: Final = "spicesync_outbox"

# One on-demand reconcile at a time; the schedule's runs get this id plus their start time.
RECONCILE_WORKFLOW_ID: Final = "spicesync-reconcile"
# The CDC relay's reconciles (a lost slot, a truncated table): one id per incident, so a relay
# that starts one again after a crash joins it (docs/follow-mode.md#change-data-capture).
CDC_RECONCILE_WORKFLOW_PREFIX: Final = "spicesync-cdc-reconcile"
# Slot lag past which an idle CDC relay writes a heartbeat (a logical decoding message of its
# own, in its own transaction) so the slot can be confirmed past other tables' WAL.
CDC_HEARTBEAT_BYTES: Final = 16 * 1024 * 1024
RECONCILE_SCHEDULE_ID: Final = "spicesync-reconcile"
# One backfill at a time: starting it again while it runs joins the running one.
BACKFILL_WORKFLOW_ID: Final = "spicesync-backfill"

# How long a change to a user that does not exist (yet) waits for its creation before it fails.
HELD_CHANGE_GRACE: Final = timedelta(minutes=5)

# Temporal admits at most this many in-flight updates per workflow (``history.maxInFlightUpdates``,
# 10 by default). Each waiting caller holds one, so a burst of events for one user needs more;
# the local stack raises the limit to this, and a production namespace should too.
MAX_IN_FLIGHT_UPDATES: Final = 500

# Events one run of a user's workflow applies before it continues as new (fresh history).
EVENTS_PER_RUN: Final = 500


# Temporal dynamic config spicesync relies on: the local stack and the tests start the dev
# server with it, and ``spicesync setup-namespace`` prints it for a production cluster (dynamic
# config lives in the server's config file, out of any client API's reach).
TEMPORAL_DYNAMIC_CONFIG: Final[dict[str, bool | int]] = {
    # Without it, a burst of events for one user past 10 waiting callers is refused.
    "history.maxInFlightUpdates": MAX_IN_FLIGHT_UPDATES,
    # The first write of an update's event is a normal activity (workflows/steps.py explains
    # why): eager dispatch hands it back to the worker that scheduled it, without a poll.
    "system.enableActivityEagerExecution": True,
}


def dynamic_config_value(value: bool | int) -> str:
    """A dynamic config value as Temporal's YAML and the dev server's flag spell it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def dev_server_dynamic_config() -> list[str]:
    """``--dynamic-config-value`` arguments for the Temporal dev server (stack and tests)."""
    # Eager workflow start too, which spicesync does not need (the SDK has no eager
    # update-with-start) but costs nothing and keeps the dev server as it always ran.
    values = {"system.enableEagerWorkflowStart": True, **TEMPORAL_DYNAMIC_CONFIG}
    return [
        arg
        for key, value in values.items()
        for arg in ("--dynamic-config-value", f"{key}={dynamic_config_value(value)}")
    ]


# Search attributes the stack registers on the dev server (``spicesync setup-namespace`` on a
# cluster). Values are opaque ids only.
SEARCH_ATTRIBUTES: Final[dict[str, str]] = {
    "SpicesyncUserId": "Keyword",
    "SpicesyncOrgId": "Keyword",
    "SpicesyncStage": "Keyword",
    "SpicesyncStageSince": "Datetime",
    "SpicesyncLastError": "Keyword",
}
# The two that find a user's sync; a starter sets them with the start, so a new run that stays
# healthy never has to upsert them.
USER_ID_ATTRIBUTE: Final = SearchAttributeKey.for_keyword("SpicesyncUserId")
ORG_ID_ATTRIBUTE: Final = SearchAttributeKey.for_keyword("SpicesyncOrgId")

# Stages in which a sync is working on a store; one that stays in them too long is stuck.
ACTIVE_STAGES: Final = (
    # A run that starts afresh reads what the App DB has applied before its first event.
    "reading_row",
    "inserting_row",
    "reading_permissions",
    "writing_permissions",
    "recording_row",
    "compensating",
    "parked",
    # Follow mode (workflows/followed_user.py): reading the row and writing SpiceDB.
    "syncing",
)

# One attempt of an activity; retries are the RetryPolicy's job, so keep each try short.
ACTIVITY_START_TO_CLOSE: Final = 15.0

# A forward step's single try as a local activity, from being scheduled (a busy worker's queue
# for local-activity slots included) to its result. Healthy steps take milliseconds; past this
# the step carries on as a normal, visible activity. Short, because a local activity stretches
# the workflow task it runs in: a few of these in a row must stay far below the workflow task
# timeout (10 s), and below the SDK's 5 s warning, even on a busy box.
LOCAL_STEP_TIMEOUT: Final = 1.0

# A SpiceDB call that has not answered in this time is treated as DEADLINE_EXCEEDED (transient).
SPICEDB_CALL_TIMEOUT_SECONDS: Final = 5.0


def user_workflow_id(user_id: uuid.UUID | str) -> str:
    """Return the id of the workflow that applies ``user_id``'s events.

    The id is derived from the business key alone, so every event of a user, duplicates
    included, reaches the same workflow, which applies them in order, each at most once.

    Args:
        user_id: The user's UUID.

    Returns:
        The workflow id; it carries only the opaque user id.
    """
    return f"{USER_WORKFLOW_ID_PREFIX}{uuid.UUID(str(user_id))}"


def followed_user_workflow_id(user_id: str) -> str:
    """Return the id of the workflow that keeps a followed user's relationships in step.

    Args:
        user_id: The user's id in the application's table (opaque: a uuid, a number or a
            SpiceDB-safe text id; see :func:`spicesync.mapping.valid_user_id`).

    Returns:
        The workflow id; it carries only the opaque user id.
    """
    return f"{FOLLOWED_USER_WORKFLOW_ID_PREFIX}{user_id}"
