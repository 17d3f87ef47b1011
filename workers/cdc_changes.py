"""From a slot's decoded messages to the changes the CDC relay delivers, and how far to confirm.

Pure: :func:`read_transactions` turns pgoutput messages into committed transactions of the
mapped table (which users' rows changed, and whether the table was truncated),
:func:`coalesce` makes one ``user_changed`` per user of a batch, and :func:`confirmable`
says up to which transaction every change was accepted, so the slot's confirmed position never
passes a change Temporal has not accepted.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from spicesync.models import UserChangedInput
from workers.pgoutput import Begin, Commit, DecodeError, Decoder, RowChange, Truncate, format_lsn

__all__ = [
    "Transaction",
    "UserChange",
    "coalesce",
    "confirmable",
    "read_transactions",
]


@dataclass
class Transaction:
    """One committed transaction's changes of the mapped table.

    Attributes:
        commit_lsn: Where its commit record starts (the version when the mapping has no version
            column, and the position the changes carry).
        end_lsn: Where its commit record ends: the slot's confirmed position once it is done.
        commit_time: When it committed (for the lag in seconds).
        users: ``(user id, version)`` per changed row, in order; the version is the version
            column's value after an insert or update, ``None`` after a delete (the row has none)
            or when the column was NULL, and the commit position without a version column.
        truncated: The mapped table was truncated in it.
    """

    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    users: list[tuple[str, int | None]] = field(default_factory=list)
    truncated: bool = False


@dataclass(frozen=True)
class UserChange:
    """One user's change in a batch: the rows of all its transactions there, as one."""

    user_id: str
    version: int | None
    commit_lsn: int

    def change(self) -> UserChangedInput:
        """The ``user_changed`` signal's payload (the last commit's WAL position as position)."""
        return UserChangedInput(
            user_id=self.user_id,
            version=self.version,
            position=f"wal:{format_lsn(self.commit_lsn)}",
            source="cdc",
        )


def read_transactions(
    decoder: Decoder,
    messages: Iterable[bytes],
    *,
    table_oid: int,
    id_column: str,
    version_column: str | None,
) -> list[Transaction]:
    """The committed transactions in ``messages`` and their changes of the mapped table.

    Args:
        decoder: The slot's decoder (it keeps the tables' layouts between calls).
        messages: pgoutput messages in commit order, whole transactions.
        table_oid: The mapped table; changes of any other table are ignored.
        id_column: The mapping's id column.
        version_column: The mapping's version column, if any.

    Returns:
        Every transaction, in commit order, with its changes of the mapped table (none for
        another table's or the relay's heartbeat: confirming past it keeps no WAL back).

    Raises:
        DecodeError: A message is malformed, or a row change lacks the id (the REPLICA IDENTITY
            was changed under the relay).
    """
    done: list[Transaction] = []
    current: list[tuple[str, int | None]] = []
    truncated = False
    for data in messages:
        message = decoder.decode(data)
        if isinstance(message, Begin):
            current, truncated = [], False
        elif isinstance(message, RowChange) and message.relation.oid == table_oid:
            current += _users(message, id_column, version_column)
        elif isinstance(message, Truncate):
            truncated = truncated or any(r.oid == table_oid for r in message.relations)
        elif isinstance(message, Commit):
            users = [(u, message.commit_lsn if version_column is None else v) for u, v in current]
            done.append(
                Transaction(
                    message.commit_lsn, message.end_lsn, message.commit_time, users, truncated
                )
            )
    return done


def _users(
    change: RowChange, id_column: str, version_column: str | None
) -> list[tuple[str, int | None]]:
    users: list[tuple[str, int | None]] = []
    if change.new is not None:
        if id_column not in change.new:
            raise DecodeError(f"an {change.kind} without the id column")
        version = change.new.get(version_column) if version_column else None
        users.append((change.new[id_column], None if version is None else int(version)))
    if change.old is not None:
        if id_column not in change.old:
            raise DecodeError(f"a {change.kind} whose old key lacks the id column")
        old_id = change.old[id_column]
        # A delete, or an update that moved the row to another id: the old user changed too,
        # and has no row (so no version) any more.
        if not users or users[0][0] != old_id:
            users.append((old_id, None))
    return users


def coalesce(transactions: Sequence[Transaction]) -> list[UserChange]:
    """One change per user, in the order of each user's first row change.

    A sync reads the row as it is, so one delivery stands for every change of the user in the
    batch. Its version is the highest one when every change had one, else ``None`` (synced
    whatever the workflow applied: a delete, say).
    """
    versions: dict[str, list[int | None]] = {}
    last_commit: dict[str, int] = {}
    for transaction in transactions:
        for user_id, version in transaction.users:
            versions.setdefault(user_id, []).append(version)
            last_commit[user_id] = transaction.commit_lsn
    changes = []
    for user_id, known in versions.items():
        numbers = [v for v in known if v is not None]
        version = max(numbers) if len(numbers) == len(known) else None
        changes.append(UserChange(user_id, version, last_commit[user_id]))
    return changes


def confirmable(
    transactions: Sequence[Transaction],
    delivered: Collection[str],
    reconciled: Collection[int],
) -> int | None:
    """The end of the longest run of leading transactions whose every change was accepted.

    Args:
        transactions: The batch, in commit order.
        delivered: Users whose change Temporal accepted (or that can never have one).
        reconciled: Commit positions of truncates whose reconcile Temporal accepted.

    Returns:
        The position to confirm the slot at; ``None`` if not even the first is done.
    """
    position = None
    for transaction in transactions:
        if transaction.truncated and transaction.commit_lsn not in reconciled:
            break
        if any(user_id not in delivered for user_id, _ in transaction.users):
            break
        position = transaction.end_lsn
    return position
