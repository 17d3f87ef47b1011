"""The scan for emails and names in spans, logs and metrics finds them however they are written."""

from __future__ import annotations

import json

from chaos.leaks import Leak, find_leaks
from spicesync.models import CreateUserInput


def _user(email: str, name: str) -> CreateUserInput:
    return CreateUserInput(
        user_id="00000000-0000-4000-8000-000000000001",
        email=email,
        name=name,
        org_id="acme",
        role="member",
    )


def test_a_lower_cased_email_in_a_json_escaped_span_is_found() -> None:
    user = _user("Zoe.Q@Example.com", "Zoë Ñandú")
    span = json.dumps({"status": {"description": "Key (lower(email))=(zoe.q@example.com)"}})
    log = json.dumps({"message": "hello Zoë Ñandú"})  # ensure_ascii: written as Zo\\u00eb
    assert "Zoë" not in log
    leaks = find_leaks({"spans": span, "log": log, "metrics": "nothing here"}, [user])
    assert leaks == [Leak(user.user_id, "email", "spans"), Leak(user.user_id, "name", "log")]


def test_values_too_short_to_tell_from_noise_are_not_looked_for() -> None:
    # The name (4 characters) is in the log, and not reported.
    assert find_leaks({"log": "Ada\x07 was here"}, [_user("ann@example.com", "Ada\x07")]) == []


def test_a_line_that_is_not_json_is_searched_as_it_is() -> None:
    user = _user("ann@example.com", "Ann Quist")
    leaks = find_leaks({"log": "{not json ann quist"}, [user])
    assert leaks == [Leak(user.user_id, "name", "log")]
