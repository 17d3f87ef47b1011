"""How one user's SpiceDB relationships differ from the App DB: pure, tested alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from spicesync.models import Drift, Membership, MembershipsSnapshot

__all__ = ["IN_FLIGHT", "AppRow", "classify"]

IN_FLIGHT: Final = "in_flight"


@dataclass(frozen=True)
class AppRow:
    """What the App DB says about a user, as far as permissions go."""

    user_id: str
    org_id: str
    role: str
    version: int
    # A live creation inserted the row and has not written SpiceDB yet.
    creating: bool = False


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
    if row.creating or (snapshot.marker is not None and snapshot.marker > row.version):
        return IN_FLIGHT
    target = Membership(user_id=row.user_id, org_id=row.org_id, role=row.role)
    extra = [m for m in memberships if m != target]
    if extra:
        return Drift(user_id=row.user_id, kind="mismatched", deletions=len(extra))
    if target not in memberships:
        return Drift(user_id=row.user_id, kind="missing")
    return None
