"""What application code calls to deliver user events."""

from starters.user_events import (
    EventNotAccepted,
    SyncOutcome,
    UserSyncFailed,
    WaitFor,
    change_role,
    create_user,
    delete_user,
    move_user,
    submit_event,
)

__all__ = [
    "EventNotAccepted",
    "SyncOutcome",
    "UserSyncFailed",
    "WaitFor",
    "change_role",
    "create_user",
    "delete_user",
    "move_user",
    "submit_event",
]
