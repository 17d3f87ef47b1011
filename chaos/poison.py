"""Malformed user-creation events for the "poison inputs" fault scenario.

Every :class:`PoisonCase` is a ``user.created`` event with exactly one field wrong: the others
are valid (a fresh version-4 user id, an email unique to the case, a plain name, the scenario's
organization and the ``member`` role), so the rejection can only come from the named field. The
scenario expects every case to be refused with ``InvalidUserInput`` before anything is written,
and the refusal to name the field without echoing its value (messages end up in the workflow
history).

:func:`case_variants` gives the opposite kind of input: pairs of valid events whose emails differ
only in case, of which exactly one may sync (the other fails with ``DuplicateEmail``, since
emails are compared case-insensitively).

Everything is drawn from ``random.Random(seed)``: the same seed gives the same events. Against a
stack that keeps its users between runs, use a fresh seed per run, or the valid pairs of
:func:`case_variants` collide with those of the previous run.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from spicesync.models import CreateUserInput
from spicesync.validation import (
    MAX_EMAIL_LENGTH,
    MAX_NAME_LENGTH,
    MAX_ORG_ID_LENGTH,
    ROLES,
    user_input_problems,
)

__all__ = ["PoisonCase", "case_variants", "category_labels", "poison_cases"]


@dataclass(frozen=True)
class PoisonCase:
    """One malformed user-creation event.

    Attributes:
        label: The short category name, e.g. ``"user_id: not a UUID"``.
        user: The event; only ``field`` is wrong.
        field: The field that is wrong (the rejection must name it).
    """

    label: str
    user: CreateUserInput
    field: str


_SQL_INJECTIONS: Final = (
    "x'; DROP TABLE users;--",
    "' OR '1'='1",
    "1; DELETE FROM users WHERE 1=1",
    "'); TRUNCATE users CASCADE;--",
    '" OR ""="',
    "x' UNION SELECT email FROM users--",
)
_VALID_NAMES: Final = (
    "Ada Lovelace",
    "Grace Hopper",
    "Zoë Ñandú",
    "山田 太郎",
    "Seán O'Brien",
    "Anne-Marie Dubois",
    "Ngozi Okonjo",
    "Björk Guðmundsdóttir",
)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _token(rng: random.Random) -> str:
    return f"{rng.getrandbits(40):010x}"


def _sized_email(total: int) -> str:
    # local@ddd.ddd.dd.com: shaped like a valid address, exactly ``total`` characters long.
    local = "a" * 64
    body = total - len(local) - len("@") - len(".com")
    full_labels, last = divmod(body, 63)
    if last == 0:
        full_labels, last = full_labels - 1, 63
    domain = ("d" * 62 + ".") * full_labels + "d" * last
    return f"{local}@{domain}.com"


def _upper_uuid(rng: random.Random) -> str:
    while True:
        value = _uuid(rng)
        if value.upper() != value:
            return value.upper()


_ARABIC_INDIC: Final = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")

# (label, field, value maker). The maker gets the case's RNG and its ordinal.
_Maker = Callable[[random.Random, int], str]
_CATEGORIES: Final[tuple[tuple[str, str, _Maker], ...]] = (
    # --- user_id: must be a lower-case canonical UUID ---
    (
        "user_id: not a UUID",
        "user_id",
        lambda r, i: r.choice(("42", "not-a-uuid", f"user-{i}", "g" * 32, "1234-5678")),
    ),
    ("user_id: upper-case UUID", "user_id", lambda r, i: _upper_uuid(r)),
    ("user_id: UUID in braces", "user_id", lambda r, i: "{" + _uuid(r) + "}"),
    ("user_id: urn:uuid: prefix", "user_id", lambda r, i: "urn:uuid:" + _uuid(r)),
    ("user_id: UUID without hyphens", "user_id", lambda r, i: uuid.UUID(_uuid(r)).hex),
    ("user_id: empty", "user_id", lambda r, i: ""),
    ("user_id: SQL injection", "user_id", lambda r, i: r.choice(_SQL_INJECTIONS)),
    (
        "user_id: surrounding whitespace",
        "user_id",
        lambda r, i: r.choice((" {} ", "{}\n", "\t{}")).format(_uuid(r)),
    ),
    (
        "user_id: non-ASCII digits",
        "user_id",
        lambda r, i: _uuid(r).translate(_ARABIC_INDIC),
    ),
    ("user_id: NUL byte", "user_id", lambda r, i: _uuid(r) + "\x00"),
    # --- org_id: 1-128 characters of letters, digits, '_' or '-' ---
    ("org_id: SQL injection", "org_id", lambda r, i: r.choice(_SQL_INJECTIONS)),
    ("org_id: contains '/'", "org_id", lambda r, i: f"acme/{i}"),
    ("org_id: contains '#'", "org_id", lambda r, i: f"acme#member{i}"),
    ("org_id: contains '@'", "org_id", lambda r, i: f"acme@user{i}"),
    ("org_id: contains a space", "org_id", lambda r, i: f"acme corp {i}"),
    ("org_id: contains '*'", "org_id", lambda r, i: r.choice(("*", f"acme*{i}"))),
    ("org_id: contains '|' or ':'", "org_id", lambda r, i: r.choice((f"a|{i}", f"org:{i}"))),
    (
        "org_id: oversize",
        "org_id",
        lambda r, i: "o" * (MAX_ORG_ID_LENGTH + 1 + r.randrange(64)),
    ),
    ("org_id: empty", "org_id", lambda r, i: ""),
    ("org_id: non-ASCII letters", "org_id", lambda r, i: f"örg-{i}"),
    ("org_id: trailing newline", "org_id", lambda r, i: f"acme-{i}\n"),
    # --- email: local@domain.tld, ASCII, no spaces, at most 254 characters ---
    (
        "email: SQL injection",
        "email",
        lambda r, i: r.choice(
            (
                f"x{i}@example.com'; DROP TABLE users;--",
                "x'; DROP TABLE users;--@example.com",
                f"' OR 1=1 --{i}@example.com",
            )
        ),
    ),
    ("email: no @", "email", lambda r, i: f"user{i}.example.com"),
    ("email: two @", "email", lambda r, i: f"user{i}@@example.com"),
    (
        "email: contains spaces",
        "email",
        lambda r, i: r.choice((f"ann smith{i}@example.com", f"ann{i}@exa mple.com")),
    ),
    (
        "email: oversize",
        "email",
        lambda r, i: _sized_email(r.choice((300, MAX_EMAIL_LENGTH + 1))),
    ),
    ("email: local part oversize", "email", lambda r, i: "l" * 65 + "@example.com"),
    ("email: non-ASCII", "email", lambda r, i: r.choice(("ü@exämple.com", f"ünï{i}@example.com"))),
    ("email: no TLD", "email", lambda r, i: f"user{i}@localhost"),
    ("email: trailing newline", "email", lambda r, i: f"user{i}@example.com\n"),
    ("email: empty", "email", lambda r, i: ""),
    # --- name: 1-200 characters, no control, format, line-break or unassigned characters ---
    ("name: empty", "name", lambda r, i: ""),
    (
        "name: whitespace only",
        "name",
        lambda r, i: r.choice(("    ", " \t\n ", "\u3000\u00a0\u2003")),
    ),
    ("name: oversize", "name", lambda r, i: "n" * (MAX_NAME_LENGTH + 1 + r.randrange(64))),
    ("name: NUL byte", "name", lambda r, i: r.choice(("Ada\x00Lovelace", "\x00"))),
    ("name: control character", "name", lambda r, i: r.choice(("Ada\x07", "Ada\x08\x08\x08"))),
    ("name: ANSI escape", "name", lambda r, i: "\x1b[31mAda Lovelace\x1b[0m"),
    ("name: line break", "name", lambda r, i: r.choice(("Ada\nLovelace", "Ada\r\nAdmin"))),
    ("name: Unicode line separator", "name", lambda r, i: r.choice(("Ada\u2028L", "Ada\u2029"))),
    ("name: bidi override", "name", lambda r, i: "Ada \u202egnp.exe"),
    ("name: private-use code point", "name", lambda r, i: "Ada \ue000"),
    ("name: unassigned code point", "name", lambda r, i: "Ada \u0378"),
    ("name: lone surrogate", "name", lambda r, i: "Ada \ud800"),
    ("name: zero-width joiner only", "name", lambda r, i: r.choice(("\u200d", "\u200d\u200d"))),
    # --- role: one of ROLES ---
    ("role: unknown role", "role", lambda r, i: r.choice(("owner", "root", "superuser"))),
    ("role: wrong case", "role", lambda r, i: r.choice(("ADMIN", "Member"))),
    ("role: empty", "role", lambda r, i: ""),
    ("role: injection", "role", lambda r, i: r.choice(("admin; drop", "admin' --"))),
    ("role: padded", "role", lambda r, i: r.choice(("member ", "\tadmin"))),
)


def category_labels() -> list[str]:
    """The labels of every category :func:`poison_cases` cycles through.

    Returns:
        One label per category, in definition order.
    """
    return [label for label, _, _ in _CATEGORIES]


def _valid_user(rng: random.Random, org_id: str, ordinal: int, tag: str) -> CreateUserInput:
    return CreateUserInput(
        user_id=_uuid(rng),
        email=f"poison-{tag}-{ordinal}@example.com",
        name=rng.choice(_VALID_NAMES),
        org_id=org_id,
        role="member",
    )


def _check_org_id(org_id: str) -> None:
    probe = CreateUserInput(
        user_id=str(uuid.UUID(int=0, version=4)),
        email="probe@example.com",
        name="Probe",
        org_id=org_id,
        role=ROLES[0],
    )
    if user_input_problems(probe):
        raise ValueError("org_id: must itself be a valid organization id")


def poison_cases(count: int, *, org_id: str, seed: int) -> list[PoisonCase]:
    """Malformed user-creation events, cycling through every category.

    Rounds ``count`` up to whole cycles, so each category appears equally often; the order of
    the categories is shuffled in each cycle.

    Args:
        count: How many cases at least.
        org_id: The (valid) organization of the cases whose wrong field is not ``org_id``.
        seed: The seed of ``random.Random``: the same seed gives the same cases.

    Returns:
        At least ``count`` cases (at least one per category), each with exactly ``field`` wrong.

    Raises:
        ValueError: ``org_id`` is not a valid organization id.
    """
    _check_org_id(org_id)
    rng = random.Random(seed)
    tag = _token(rng)
    cycles = max(1, -(-count // len(_CATEGORIES)))
    cases: list[PoisonCase] = []
    for _ in range(cycles):
        order: list[tuple[str, str, _Maker]] = list(_CATEGORIES)
        rng.shuffle(order)
        for label, field, make in order:
            ordinal = len(cases)
            valid = _valid_user(rng, org_id, ordinal, tag)
            user = CreateUserInput(**(valid.model_dump() | {field: make(rng, ordinal)}))
            cases.append(PoisonCase(label=label, user=user, field=field))
    return cases


def _case_variant(email: str, rng: random.Random) -> str:
    # Flip the case of some letters of the lower-case ``email``; at least one always changes.
    letters = [i for i, ch in enumerate(email) if ch.isalpha()]
    flipped = set(rng.sample(letters, k=rng.randint(1, len(letters))))
    return "".join(ch.upper() if i in flipped else ch for i, ch in enumerate(email))


def case_variants(
    org_id: str, seed: int, *, count: int = 20
) -> list[tuple[CreateUserInput, CreateUserInput]]:
    """Pairs of valid user-creation events whose emails differ only in case.

    Emails are compared case-insensitively, so exactly one event of each pair may sync and the
    other must fail with ``DuplicateEmail``. The user ids are distinct, and so are the emails of
    different pairs (case-insensitively).

    Args:
        org_id: The (valid) organization of every event.
        seed: The seed of ``random.Random``: the same seed gives the same pairs.
        count: How many pairs.

    Returns:
        ``count`` pairs ``(lower-case email, same email in mixed case)``.

    Raises:
        ValueError: ``org_id`` is not a valid organization id.
    """
    _check_org_id(org_id)
    rng = random.Random(seed)
    tag = _token(rng)
    pairs: list[tuple[CreateUserInput, CreateUserInput]] = []
    for n in range(count):
        first_name = rng.choice(("ann", "bob", "chloe", "dmitri", "eve", "farah"))
        email = f"{first_name}.{tag}.{n}@example.com"
        first, second = rng.sample(_VALID_NAMES, k=2)
        pairs.append(
            (
                CreateUserInput(
                    user_id=_uuid(rng), email=email, name=first, org_id=org_id, role="member"
                ),
                CreateUserInput(
                    user_id=_uuid(rng),
                    email=_case_variant(email, rng),
                    name=second,
                    org_id=org_id,
                    role="member",
                ),
            )
        )
    return pairs
