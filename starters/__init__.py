"""What application code calls to start a sync."""

from starters.create_user import CreateUserOutcome, UserCreationFailed, WaitFor, create_user

__all__ = ["CreateUserOutcome", "UserCreationFailed", "WaitFor", "create_user"]
