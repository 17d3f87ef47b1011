from __future__ import annotations

from typing import Any

import pytest

from chaos.poison import PoisonCase, case_variants, category_labels, poison_cases
from spicesync.errors import InvalidUserInput
from spicesync.models import CreateUserInput
from spicesync.validation import user_input_problems
from starters.user_events import create_user

CASES = poison_cases(250, org_id="org-1", seed=7)


class _UnreachableClient:
    """Stands in for a Temporal client: a valid event would reach it, a rejected one never."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"validation let the event through to client.{name}")


async def _rejection(user: CreateUserInput) -> str:
    # The real starter path: create_user builds the UserEvent and validates it before it
    # touches the client.
    with pytest.raises(InvalidUserInput) as caught:
        await create_user(user, client=_UnreachableClient(), task_queue="unused")  # type: ignore[arg-type]
    return str(caught.value)


def test_many_cases_across_many_categories() -> None:
    assert len(CASES) >= 250
    labels = {case.label for case in CASES}
    assert len(labels) >= 20
    assert labels == set(category_labels())
    for case in CASES:
        assert case.label.split(":")[0] == case.field


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c.label}" for i, c in enumerate(CASES)])
async def test_every_case_is_rejected_naming_the_field_not_the_value(case: PoisonCase) -> None:
    message = await _rejection(case.user)
    assert f"{case.field}:" in message
    value = getattr(case.user, case.field)
    if len(value) > 3:
        assert value not in message


@pytest.mark.parametrize("case", CASES[:60], ids=[c.label for c in CASES[:60]])
def test_only_the_named_field_is_wrong(case: PoisonCase) -> None:
    problems = user_input_problems(case.user)
    assert [p.split(":")[0] for p in problems] == [case.field]


def test_other_fields_are_valid_and_unique() -> None:
    assert len({c.user.user_id for c in CASES if c.field != "user_id"}) == sum(
        c.field != "user_id" for c in CASES
    )
    emails = [c.user.email.lower() for c in CASES if c.field != "email"]
    assert len(set(emails)) == len(emails)
    assert all(c.user.org_id == "org-1" for c in CASES if c.field != "org_id")
    assert all(c.user.role == "member" for c in CASES if c.field != "role")


def test_same_seed_same_cases() -> None:
    assert poison_cases(250, org_id="org-1", seed=7) == CASES
    assert poison_cases(250, org_id="org-1", seed=8) != CASES


def test_invalid_org_id_is_refused() -> None:
    with pytest.raises(ValueError, match="org_id"):
        poison_cases(10, org_id="bad org", seed=1)


def test_case_variants_are_valid_and_differ_only_by_case() -> None:
    pairs = case_variants("org-1", seed=7)
    assert len(pairs) == 20
    assert case_variants("org-1", seed=7) == pairs
    seen: set[str] = set()
    for first, second in pairs:
        assert user_input_problems(first) == []
        assert user_input_problems(second) == []
        assert first.user_id != second.user_id
        assert first.email != second.email
        assert first.email.lower() == second.email.lower()
        assert first.org_id == second.org_id == "org-1"
        seen.add(first.email.lower())
    assert len(seen) == len(pairs)
