"""Deliver user lifecycle events: :mod:`spicesync.client`, under the starters' name.

The application API lives in the shared package so that the ``spicesync-client`` distribution
can ship it without the worker's code (docs/packaging.md); this module keeps the starters'
import path working for the CLI, the bench, chaos and the tests.
"""

from spicesync.client import (
    DEFAULT_ACCEPT_WITHIN,
    EventIdConflict,
    EventNotAccepted,
    InvalidUserInput,
    SyncOutcome,
    UserSyncFailed,
    WaitFor,
    change_role,
    create_user,
    creation_event,
    delete_user,
    move_user,
    submit_event,
)

__all__ = [
    "DEFAULT_ACCEPT_WITHIN",
    "EventIdConflict",
    "EventNotAccepted",
    "InvalidUserInput",
    "SyncOutcome",
    "UserSyncFailed",
    "WaitFor",
    "change_role",
    "create_user",
    "creation_event",
    "delete_user",
    "move_user",
    "submit_event",
]
