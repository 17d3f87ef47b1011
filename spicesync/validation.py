"""Validation of user events.

Run by the starter before anything starts and by the workflow before anything is written.

Error messages name the offending fields and the rule, never the value: the message is kept in
the workflow history, and the value may be personal data.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import Final

from spicesync.errors import InvalidUserInput
from spicesync.models import CreateUserInput, UserEvent

__all__ = [
    "EVENT_KINDS",
    "MAX_NAME_LENGTH",
    "ROLES",
    "event_problems",
    "user_input_problems",
    "validate_event",
]

ROLES: Final = ("member", "admin")
EVENT_KINDS: Final = ("created", "role_changed", "moved", "deleted")
MAX_VERSION: Final = 2**62
_EVENT_ID: Final = re.compile(r"^[A-Za-z0-9._:@-]{1,200}$")
MAX_EMAIL_LENGTH: Final = 254
MAX_NAME_LENGTH: Final = 200
MAX_ORG_ID_LENGTH: Final = 128

# Deliberately simple: one '@', no whitespace, a dotted domain of DNS-like labels. Deliverability
# is the app's business; this only keeps garbage out of both stores.
_EMAIL: Final = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
    r"@(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
# A subset of SpiceDB's object id alphabet; '/', '|', '=' and '+' are left out so ids stay
# readable in the UI and in search attributes.
_ORG_ID: Final = re.compile(r"^[A-Za-z0-9_-]+$")


def _name_problem(name: str) -> str | None:
    stripped = name.strip()
    if not stripped:
        return "name: must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"name: must be at most {MAX_NAME_LENGTH} characters"
    # Zl/Zp (U+2028, U+2029) are line breaks that ``Cc`` does not cover.
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"} for ch in name):
        return "name: must not contain control, format, line-break or unassigned characters"
    return None


def user_input_problems(event: CreateUserInput) -> list[str]:
    """List everything wrong with a user-creation event.

    Args:
        event: The event as received.

    Returns:
        One message per problem; empty when the event is valid.
    """
    problems: list[str] = []
    try:
        parsed = uuid.UUID(event.user_id)
        if str(parsed) != event.user_id:
            problems.append("user_id: must be a lower-case canonical UUID")
    except ValueError:
        problems.append("user_id: must be a UUID")
    if len(event.email) > MAX_EMAIL_LENGTH:
        problems.append(f"email: must be at most {MAX_EMAIL_LENGTH} characters")
    elif not _EMAIL.fullmatch(event.email):
        problems.append("email: must look like local@domain.tld (ASCII, no spaces)")
    if (name_problem := _name_problem(event.name)) is not None:
        problems.append(name_problem)
    if not 1 <= len(event.org_id) <= MAX_ORG_ID_LENGTH or not _ORG_ID.fullmatch(event.org_id):
        problems.append(
            f"org_id: must be 1-{MAX_ORG_ID_LENGTH} characters of letters, digits, '_' or '-'"
        )
    if event.role not in ROLES:
        problems.append(f"role: must be one of {', '.join(ROLES)}")
    return problems


def event_problems(event: UserEvent) -> list[str]:
    """List everything wrong with a lifecycle event.

    Args:
        event: The event as received.

    Returns:
        One message per problem; empty when the event is valid.
    """
    problems: list[str] = []
    if not _EVENT_ID.fullmatch(event.event_id):
        problems.append("event_id: must be 1-200 characters of letters, digits and . _ : @ -")
    if not 1 <= event.version < MAX_VERSION:
        problems.append("version: must be a positive integer")
    if event.kind not in EVENT_KINDS:
        problems.append(f"kind: must be one of {', '.join(EVENT_KINDS)}")
        return problems
    as_user = CreateUserInput(
        user_id=event.user_id,
        email=event.email if event.kind == "created" else "x@example.org",
        name=event.name if event.kind == "created" else "x",
        org_id=event.org_id if event.kind != "deleted" else "x",
        role=event.role if event.kind != "deleted" else "member",
    )
    problems.extend(user_input_problems(as_user))
    return problems


def validate_event(event: UserEvent) -> None:
    """Raise if the lifecycle event cannot be applied.

    Args:
        event: The event as received.

    Raises:
        InvalidUserInput: With every problem found, one per clause.
    """
    problems = event_problems(event)
    if problems:
        raise InvalidUserInput("invalid event: " + "; ".join(problems))
