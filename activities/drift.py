"""How one user's SpiceDB relationships differ from the App DB: pure, tested alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from spicesync.mapping import Tuple
from spicesync.models import Drift, Membership, MembershipsSnapshot

__all__ = ["IN_FLIGHT", "AppRow", "classify", "classify_followed"]

IN_FLIGHT: Final = "in_flight"


@dataclass(frozen=True)
class AppRow:
    """What the App DB says about a user, as far as permissions go."""

    user_id: str
    org_id: str
    role: str
    version: int
    # A creation inserted the row and has not finished its sync yet.
    creating: bool = False
    # ``creating``, and for longer than the reconcile waits, with no sync of the user's in an
    # active stage: the creation never finished (see :func:`classify`).
    unfinished: bool = False
    # Nothing spicesync wrote: neither a creation of its own nor any permissions write.
    never_synced: bool = False


def classify(
    row: AppRow | None, snapshot: MembershipsSnapshot
) -> Drift | Literal["in_flight"] | None:
    """Compare one user's row (``None``: no row) with their SpiceDB relationships.

    Args:
        row: The App DB's view of the user.
        snapshot: The user's memberships and version marker in SpiceDB.

    Returns:
        ``None`` when both agree; :data:`IN_FLIGHT` when a live sync is between its SpiceDB
        write and its row update (the difference is about to disappear, and a repair would only
        queue behind it); otherwise the drift.
    """
    memberships = snapshot.memberships
    if row is None:
        if not memberships:
            return None
        return Drift(user_id=memberships[0].user_id, kind="orphan", deletions=len(memberships))
    if row.unfinished:
        # Not a live sync: nothing will ever finish it, so the repair removes it.
        return Drift(user_id=row.user_id, kind="unfinished", deletions=len(memberships))
    if row.creating or (snapshot.marker is not None and snapshot.marker > row.version):
        return IN_FLIGHT
    target = Membership(user_id=row.user_id, org_id=row.org_id, role=row.role)
    extra = [m for m in memberships if m != target]
    if extra:
        return Drift(user_id=row.user_id, kind="mismatched", deletions=len(extra))
    if target not in memberships:
        return Drift(user_id=row.user_id, kind="unsynced" if row.never_synced else "missing")
    return None


def classify_followed(
    user_id: str, implied: frozenset[Tuple] | None, held: frozenset[Tuple], *, synced: bool
) -> Drift | None:
    """Compare what a followed user's row implies with the managed relationships SpiceDB holds.

    Follow mode has no in-flight state to spare: every sync is level-triggered, so a repair
    delivered while a live change is queued only coalesces with it.

    Args:
        user_id: The user's id.
        implied: What the row implies through the mapping; ``None`` when there is no row.
        held: The managed relationships SpiceDB holds for the user.
        synced: spicesync has synced the user before (a bookkeeping row exists).

    Returns:
        ``None`` when both agree, otherwise the drift. Only a user who would be left with no
        relationship at all carries ``deletions`` (what the prune cap guards).
    """
    if implied is None:
        return Drift(user_id=user_id, kind="orphan", deletions=len(held)) if held else None
    if held == implied:
        return None
    if held <= implied:
        return Drift(user_id=user_id, kind="missing" if synced else "unsynced")
    return Drift(user_id=user_id, kind="extra", deletions=0 if implied else len(held))
