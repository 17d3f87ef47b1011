import uuid

import pytest

from spicesync.errors import InvalidUserInput
from spicesync.models import CreateUserInput, UserEvent
from spicesync.validation import (
    event_problems,
    user_input_problems,
    validate_event,
)


def event(**changes: str) -> CreateUserInput:
    fields = {
        "user_id": str(uuid.uuid4()),
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "org_id": "acme",
        "role": "member",
    } | changes
    return CreateUserInput(**fields)


def test_valid_event_has_no_problems() -> None:
    assert user_input_problems(event()) == []
    assert user_input_problems(event(role="admin", name="Zoë Ñandú 山田")) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"user_id": "42"}, "user_id"),
        ({"user_id": str(uuid.uuid4()).upper()}, "user_id"),
        ({"email": "no-at-sign"}, "email"),
        ({"email": "two@@example.com"}, "email"),
        ({"email": "spaces in@example.com"}, "email"),
        ({"email": "a@" + "x" * 250 + ".com"}, "email"),
        ({"email": "ünï@example.com"}, "email"),
        ({"email": "x@example.com'; DROP TABLE users;--"}, "email"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "bell\x07"}, "name"),
        ({"name": "rtl\u202eoverride"}, "name"),
        ({"name": "line\u2028separator"}, "name"),
        ({"name": "paragraph\u2029separator"}, "name"),
        ({"org_id": ""}, "org_id"),
        ({"org_id": "acme corp"}, "org_id"),
        ({"org_id": "a" * 129}, "org_id"),
        ({"org_id": "acme/../root"}, "org_id"),
        ({"role": "owner"}, "role"),
    ],
)
def test_each_rule_names_its_field(changes: dict[str, str], field: str) -> None:
    problems = user_input_problems(event(**changes))
    assert [p.split(":")[0] for p in problems] == [field]


def test_error_lists_every_problem_without_echoing_values() -> None:
    bad = lifecycle(kind="created", email="secret-address", name="", role="root")
    with pytest.raises(InvalidUserInput) as caught:
        validate_event(bad)
    message = str(caught.value)
    assert "email:" in message and "name:" in message and "role:" in message
    assert "secret-address" not in message and "root" not in message


def lifecycle(**changes: object) -> UserEvent:
    fields: dict[str, object] = {
        "event_id": "e-1",
        "user_id": str(uuid.uuid4()),
        "version": 2,
        "kind": "role_changed",
        "org_id": "acme",
        "role": "admin",
    } | changes
    return UserEvent(**fields)  # type: ignore[arg-type]


def test_valid_lifecycle_events() -> None:
    assert event_problems(lifecycle()) == []
    assert event_problems(lifecycle(kind="moved", org_id="other")) == []
    assert event_problems(lifecycle(kind="deleted", org_id="", role="")) == []
    created = lifecycle(kind="created", email="a@example.com", name="A", role="member")
    assert event_problems(created) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event_id": ""}, "event_id"),
        ({"event_id": "has space"}, "event_id"),
        ({"version": 0}, "version"),
        ({"version": -3}, "version"),
        ({"kind": "renamed"}, "kind"),
        ({"role": "root"}, "role"),
        ({"org_id": ""}, "org_id"),
        ({"kind": "created", "email": "", "name": "A"}, "email"),
    ],
)
def test_lifecycle_event_rules(changes: dict[str, object], field: str) -> None:
    problems = event_problems(lifecycle(**changes))
    assert [p.split(":")[0] for p in problems] == [field]
    with pytest.raises(InvalidUserInput):
        validate_event(lifecycle(**changes))
