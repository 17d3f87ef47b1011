"""Follow mode's mapping: which table holds the users, and which relationships a row implies.

The application supplies it as one TOML file (``spicesync.toml`` by default, path in
``SPICESYNC_CONFIG``; docs/follow-mode.md has a full example)::

    [source]
    table = "accounts"            # may be schema-qualified
    id = "account_id"             # uuid, text or bigint
    version = "row_version"       # optional: grows with every change of the row

    [[relationships]]
    resource = "organization:{team_id}"   # {column} is the row's value; a NULL skips the rule
    relation = "admin"
    subject = "user:{account_id}"
    when = "is_admin"             # optional boolean column; `unless` for the opposite

    [[relationships]]
    resource = "team:{squad}"
    relation = "{squad_role}"     # a relation taken from a column ...
    relations = ["lead", "member"]  # ... must list the relations it may take
    subject = "user:{account_id}"

The (resource type, relation) pairs the rules can produce are what spicesync *manages* for a
user: it never reads, judges or changes any other relationship, so an application's own
relations on the same objects survive everything. Every rule's subject is the user itself
(``<type>:{<id column>}``), of one subject type, which also carries the per-user version marker
(``<subject type>:<id>#sync_version@spicesync_version:<n>``) that makes every write
compare-and-set.

This module is pure: it parses and validates the file, and turns a row (a mapping of column
names to values, or ``None`` for a row that is gone) into the relationships it implies.
"""

from __future__ import annotations

import re
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "MARKER_RELATION",
    "MARKER_TYPE",
    "FollowMapping",
    "MappingError",
    "RelationshipRule",
    "SourceTable",
    "Tuple",
    "UnmappableRow",
    "load_mapping",
    "parse_mapping",
    "valid_user_id",
]

# The per-user compare-and-set marker, shared with owned mode (spicesync/spicedb.py).
MARKER_RELATION = "sync_version"
MARKER_TYPE = "spicesync_version"

# SpiceDB's own rules (authzed api v1 validation) for the names spicesync writes.
_TYPE = re.compile(r"^([a-z][a-z0-9_]{1,61}[a-z0-9]/)*[a-z][a-z0-9_]{1,62}[a-z0-9]$")
_RELATION = re.compile(r"^[a-z][a-z0-9_]{1,62}[a-z0-9]$")
_OBJECT_ID = re.compile(r"^[a-zA-Z0-9/_|\-=+]{1,1024}$")
# A user id also becomes a workflow id and a subject id: opaque, short, SpiceDB-safe.
_USER_ID = re.compile(r"^[a-zA-Z0-9/_|\-=+]{1,128}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class MappingError(ValueError):
    """The mapping file is missing or wrong; the message names the file and the bad key."""


class UnmappableRow(ValueError):
    """A row cannot be turned into relationships (e.g. a value that is no valid object id).

    The message names the rule and the column, never the value (it may not be opaque).
    """


def valid_user_id(user_id: str) -> bool:
    """Whether ``user_id`` can be a followed user's id (opaque, SpiceDB-safe, at most 128)."""
    return bool(_USER_ID.match(user_id))


def _identifier(value: str, what: str) -> str:
    if not _IDENTIFIER.match(value):
        raise ValueError(f"{what} {value!r} is not a plain SQL identifier (letters, digits, _)")
    return value


@dataclass(frozen=True, order=True)
class Tuple:
    """One relationship ``resource_type:resource_id#relation@subject_type:subject_id``."""

    resource_type: str
    resource_id: str
    relation: str
    subject_type: str
    subject_id: str

    def __str__(self) -> str:
        return (
            f"{self.resource_type}:{self.resource_id}#{self.relation}"
            f"@{self.subject_type}:{self.subject_id}"
        )


@dataclass(frozen=True)
class _Template:
    """``type:text{column}text``: a literal object type and an id built from columns."""

    object_type: str
    parts: tuple[tuple[str, bool], ...]  # (literal text, False) or (column name, True)

    @classmethod
    def parse(cls, text: str) -> _Template:
        object_type, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ValueError(f"{text!r} must look like 'type:{{column}}'")
        if not _TYPE.match(object_type):
            raise ValueError(f"{object_type!r} is not a valid SpiceDB object type")
        parts: list[tuple[str, bool]] = []
        position = 0
        for match in _PLACEHOLDER.finditer(rest):
            if match.start() > position:
                parts.append((rest[position : match.start()], False))
            parts.append((_identifier(match[1], "column"), True))
            position = match.end()
        if position < len(rest):
            parts.append((rest[position:], False))
        literal = "".join(p for p, is_column in parts if not is_column)
        if "{" in literal or "}" in literal:
            raise ValueError(f"{text!r} has an unbalanced brace")
        return cls(object_type=object_type, parts=tuple(parts))

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(p for p, is_column in self.parts if is_column)

    def render(self, row: Mapping[str, Any]) -> str | None:
        """The object id for ``row``; ``None`` when a column it uses is NULL."""
        out = []
        for part, is_column in self.parts:
            if not is_column:
                out.append(part)
                continue
            value = row[part]
            if value is None:
                return None
            out.append(_text(value))
        return "".join(out)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (uuid.UUID, int, str)):
        return str(value)
    raise TypeError(type(value).__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceTable(_Strict):
    """``[source]``: the application's users table."""

    table: str = Field(description="The table, optionally schema-qualified (schema.table).")
    id: str = Field(description="The column holding the user id (uuid, text or bigint).")
    version: str | None = Field(
        default=None, description="An integer column that grows with every change of the row."
    )

    @field_validator("table")
    @classmethod
    def _table(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) > 2:
            raise ValueError(f"{value!r}: at most schema.table")
        for part in parts:
            _identifier(part, "name")
        return value

    @field_validator("id", "version")
    @classmethod
    def _column(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value, "column")

    @property
    def qualified(self) -> str:
        """The table as a quoted SQL name."""
        return ".".join(f'"{part}"' for part in self.table.split("."))


class RelationshipRule(_Strict):
    """One ``[[relationships]]`` entry: a relationship a row implies, maybe conditionally."""

    resource: str
    relation: str
    subject: str
    relations: tuple[str, ...] | None = None
    when: str | None = None
    unless: str | None = None

    @field_validator("resource", "subject")
    @classmethod
    def _template(cls, value: str) -> str:
        _Template.parse(value)
        return value

    @field_validator("relation")
    @classmethod
    def _relation(cls, value: str) -> str:
        match = _PLACEHOLDER.fullmatch(value)
        if match:
            _identifier(match[1], "column")
        elif not _RELATION.match(value):
            raise ValueError(f"{value!r} is not a valid SpiceDB relation (nor a {{column}})")
        return value

    @field_validator("relations")
    @classmethod
    def _relations(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            if not value:
                raise ValueError("must list at least one relation")
            for relation in value:
                if not _RELATION.match(relation):
                    raise ValueError(f"{relation!r} is not a valid SpiceDB relation")
        return value

    @field_validator("when", "unless")
    @classmethod
    def _condition(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value, "column")

    @property
    def relation_column(self) -> str | None:
        """The column the relation is taken from, if it is not a literal."""
        match = _PLACEHOLDER.fullmatch(self.relation)
        return match[1] if match else None

    @property
    def possible_relations(self) -> tuple[str, ...]:
        """Every relation this rule can write."""
        if self.relation_column is None:
            return (self.relation,)
        assert self.relations is not None  # checked by FollowMapping
        return self.relations


class _MappingFile(_Strict):
    source: SourceTable
    relationships: tuple[RelationshipRule, ...] = ()


@dataclass(frozen=True)
class FollowMapping:
    """A validated mapping: what to read from the app's table and what it means in SpiceDB."""

    source: SourceTable
    rules: tuple[RelationshipRule, ...]
    origin: str = "spicesync.toml"

    @property
    def subject_type(self) -> str:
        """The users' SpiceDB object type (every rule's subject), which carries the marker."""
        return _Template.parse(self.rules[0].subject).object_type

    @property
    def managed(self) -> frozenset[tuple[str, str]]:
        """The (resource type, relation) pairs spicesync manages; nothing else is touched."""
        return frozenset(
            (_Template.parse(rule.resource).object_type, relation)
            for rule in self.rules
            for relation in rule.possible_relations
        )

    @property
    def managed_resource_types(self) -> tuple[str, ...]:
        """The resource types of the managed pairs, sorted."""
        return tuple(sorted({t for t, _ in self.managed}))

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the mapping reads, id first, each once."""
        wanted = [self.source.id]
        if self.source.version:
            wanted.append(self.source.version)
        for rule in self.rules:
            wanted += _Template.parse(rule.resource).columns
            wanted += _Template.parse(rule.subject).columns
            wanted += [c for c in (rule.relation_column, rule.when, rule.unless) if c]
        return tuple(dict.fromkeys(wanted))

    def required_schema(self) -> tuple[tuple[str, str, str], ...]:
        """(definition, relation, subject type) that SpiceDB's schema must define, marker too."""
        pairs = sorted(self.managed)
        marker = (self.subject_type, MARKER_RELATION, MARKER_TYPE)
        return (*((t, r, self.subject_type) for t, r in pairs), marker)

    def relationships(self, user_id: str, row: Mapping[str, Any] | None) -> frozenset[Tuple]:
        """The managed relationships ``row`` implies (none when the row is gone).

        Args:
            user_id: The user's id, as the events carry it.
            row: Column name to value, holding at least :attr:`columns`; ``None`` if no row.

        Returns:
            The relationships, each a :class:`Tuple`.

        Raises:
            UnmappableRow: A value gives an invalid object id, or a relation outside the
                rule's ``relations``.
        """
        if row is None:
            return frozenset()
        found: set[Tuple] = set()
        for index, rule in enumerate(self.rules):
            where = f"relationships[{index}]"
            if rule.when is not None and row[rule.when] is not True:
                continue
            if rule.unless is not None and row[rule.unless] is True:
                continue
            resource = _Template.parse(rule.resource)
            resource_id = resource.render(row)
            relation = rule.relation
            if rule.relation_column is not None:
                value = row[rule.relation_column]
                if value is None:
                    continue
                relation = str(value)
                if relation not in rule.possible_relations:
                    raise UnmappableRow(
                        f"{where}.relation: column {rule.relation_column} holds a relation"
                        " that is not in the rule's `relations`"
                    )
            if resource_id is None:
                continue
            if not _OBJECT_ID.match(resource_id):
                raise UnmappableRow(
                    f"{where}.resource: columns {', '.join(resource.columns)} give an invalid"
                    " SpiceDB object id"
                )
            found.add(
                Tuple(resource.object_type, resource_id, relation, self.subject_type, user_id)
            )
        return frozenset(found)


def parse_mapping(text: str, *, origin: str = "spicesync.toml") -> FollowMapping:
    """Parse and validate a mapping.

    Args:
        text: The TOML text.
        origin: Where it came from, for error messages.

    Returns:
        The mapping.

    Raises:
        MappingError: One line per problem, each naming the key (``relationships[1].when``).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise MappingError(f"{origin}: not valid TOML: {err}") from None
    try:
        parsed = _MappingFile.model_validate(data)
    except ValidationError as err:
        lines = []
        for problem in err.errors(include_input=False, include_url=False):
            key = ".".join(
                f"[{p}]" if isinstance(p, int) else str(p) for p in problem["loc"]
            ).replace(".[", "[")
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"{origin}: {key}: {message}")
        raise MappingError("\n".join(lines)) from None
    mapping = FollowMapping(source=parsed.source, rules=parsed.relationships, origin=origin)
    _check_rules(mapping)
    return mapping


def _check_rules(mapping: FollowMapping) -> None:
    problems = []
    if not mapping.rules:
        problems.append(f"{mapping.origin}: relationships: at least one [[relationships]] rule")
    subject_types = set()
    for index, rule in enumerate(mapping.rules):
        where = f"{mapping.origin}: relationships[{index}]"
        subject = _Template.parse(rule.subject)
        subject_types.add(subject.object_type)
        if subject.parts != ((mapping.source.id, True),):
            problems.append(
                f"{where}.subject: must be the user itself, "
                f"'{subject.object_type}:{{{mapping.source.id}}}'"
            )
        if rule.relation_column is not None and rule.relations is None:
            problems.append(
                f"{where}.relations: a relation taken from a column needs the list of relations"
                " it may take (they are what spicesync manages)"
            )
        if rule.relation_column is None and rule.relations is not None:
            problems.append(f"{where}.relations: only for a relation taken from a {{column}}")
        if rule.when is not None and rule.unless is not None:
            problems.append(f"{where}: use `when` or `unless`, not both")
        if rule.relation == MARKER_RELATION or MARKER_RELATION in (rule.relations or ()):
            problems.append(f"{where}.relation: {MARKER_RELATION!r} is spicesync's own marker")
    if len(subject_types) > 1:
        problems.append(
            f"{mapping.origin}: relationships: every subject must be of one type, found "
            + ", ".join(sorted(subject_types))
        )
    if problems:
        raise MappingError("\n".join(problems))


def load_mapping(path: Path) -> FollowMapping:
    """Read and validate the mapping file.

    Args:
        path: The file (``SPICESYNC_CONFIG``).

    Returns:
        The mapping.

    Raises:
        MappingError: The file is missing, unreadable or invalid; the message says which key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise MappingError(f"{path}: cannot read the mapping ({err.strerror})") from None
    return parse_mapping(text, origin=str(path))
