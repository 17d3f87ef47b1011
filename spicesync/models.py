"""Inputs and results of the workflow, its update and its activities.

One model per thing, carried by ``pydantic_data_converter`` on client and worker alike. Field
types are deliberately plain: an event from any producer must decode, so that validation can
reject it with a clear error instead of failing the workflow task forever.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from spicesync.constants import EVENTS_PER_RUN
from spicesync.limits import BACKFILL_BATCH_SIZE_MAX, BACKFILL_LANES_MAX, RECONCILE_PAGE_SIZE_MAX

__all__ = [
    "ApplyRowInput",
    "ApplyRowResult",
    "BackfillInput",
    "BackfillPageInput",
    "BackfillPageResult",
    "BackfillProgress",
    "BackfillResult",
    "CarriedState",
    "CheckSchemaInput",
    "CountBackfillInput",
    "CountFollowedBackfillInput",
    "CountUncheckedSyncsInput",
    "CreateUserInput",
    "DeliverEventInput",
    "DeliverRepairsInput",
    "Drift",
    "DriftCounts",
    "DriftKind",
    "EventOutcome",
    "EventStatus",
    "FollowBackfillPageInput",
    "FollowCarried",
    "FollowSyncOutcome",
    "FollowSyncStatus",
    "FollowedUserInput",
    "InsertCreatedRowInput",
    "InsertCreatedRowResult",
    "Membership",
    "MembershipsSnapshot",
    "ReadMembershipsInput",
    "ReadUserStateInput",
    "ReconcileInput",
    "ReconcileProgress",
    "ReconcileReport",
    "ReconcileUserInput",
    "ReconcileUserResult",
    "RecordFollowFailureInput",
    "RecordRepairInput",
    "RepairUsersInput",
    "RepairUsersResult",
    "ResumeInput",
    "ResumeResult",
    "SaveReportInput",
    "ScanAppDBPageInput",
    "ScanFollowedRelationshipsInput",
    "ScanFollowedRowsInput",
    "ScanPageResult",
    "ScanSpiceDBPageInput",
    "SubmitEventInput",
    "SyncFollowedUserInput",
    "SyncFollowedUserResult",
    "UndoCreatedRowInput",
    "UserChangedInput",
    "UserEvent",
    "UserState",
    "UserSyncInput",
    "WaitStage",
    "WriteMembershipsInput",
    "WriteMembershipsResult",
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Tally(BaseModel):
    # Counters a long-running workflow adds to as it goes (its own state, never shared).
    model_config = ConfigDict(extra="forbid")


class CreateUserInput(_Model):
    """A ``user.created`` event: the user the app wants to exist in both stores."""

    user_id: str
    email: str
    name: str
    org_id: str
    role: str = "member"


class Membership(_Model):
    """``organization:<org_id>#<role>@user:<user_id>`` in SpiceDB."""

    user_id: str
    org_id: str
    role: str


class MembershipsSnapshot(_Model):
    """The user's memberships and the version marker of the last sync that wrote them."""

    memberships: list[Membership]
    marker: int | None


class WriteMembershipsResult(_Model):
    """The ZedToken SpiceDB returned as ``written_at``, or what stopped a conditional write.

    ``found`` is set only when the write was conditional on a snapshot (``only_if``) and SpiceDB
    held something else: then nothing was written, ``zed_token`` is empty, and ``found`` is what
    SpiceDB holds, for the caller to plan again from.
    """

    zed_token: str = ""
    found: MembershipsSnapshot | None = None


# --- Lifecycle events (one per-user workflow applies them in version order) -------------------

EventStatus = Literal["queued", "row_committed", "applied", "stale", "failed"]
WaitStage = Literal["accepted", "row", "applied"]


class UserEvent(_Model):
    """One lifecycle event of one user, as the app emits it.

    ``version`` is the user's version in the App DB after this change (monotonic per user).
    Every event except ``deleted`` carries the membership the user must have at that version
    (``org_id`` and ``role``), so an event that arrives after a newer one can be dropped without
    losing anything: the newer one already says where the user belongs.
    """

    event_id: str
    user_id: str
    version: int
    kind: str
    org_id: str = ""
    role: str = ""
    email: str = ""
    name: str = ""


class SubmitEventInput(_Model):
    """Input of the ``submit`` update: the event and how long the caller waits."""

    event: UserEvent
    wait: WaitStage = "applied"


class DeliverEventInput(_Model):
    """Input of the ``deliver`` signal: an event handed over without waiting for its outcome."""

    event: UserEvent


class EventOutcome(_Model):
    """What became of one event (opaque ids and error codes only).

    ``content_digest`` is the ledger's keyed digest of the event's content
    (:func:`workflows.ledger.content_digest`), kept so that a later delivery of the same event
    id can be told apart as a duplicate or a conflict; ``None`` in outcomes recorded before
    digests were kept.
    """

    event_id: str
    version: int
    status: EventStatus
    zed_token: str | None = None
    error_type: str | None = None
    message: str | None = None
    content_digest: str | None = None


class UserState(_Model):
    """What the App DB says about a user: the version applied and where the user belongs."""

    exists: bool
    version: int
    org_id: str = ""
    role: str = ""
    # The event that applied ``version`` and its ZedToken, when the App DB recorded them.
    applied_event: str | None = None
    zed_token: str | None = None
    # The event whose creation inserted a row that is still pending (never finished).
    unfinished_creation: str | None = None


class CarriedState(_Model):
    """State handed from one run of the per-user workflow to the next."""

    state: UserState
    recent_outcomes: list[EventOutcome] = []


class UserSyncInput(_Model):
    """Input of the per-user workflow; ``carried`` is set when it continues as new."""

    user_id: str
    # How long the workflow stays open with nothing to do before it closes.
    idle_seconds: float = 600.0
    # Events one run applies before it continues as new with a fresh history.
    events_per_run: int = EVENTS_PER_RUN
    carried: CarriedState | None = None


class ReadUserStateInput(_Model):
    """Read the user's row (or tombstone) from the App DB."""

    user_id: str


class ApplyRowInput(_Model):
    """Write the App DB side of an event, guarded by its version."""

    event: UserEvent
    zed_token: str


class ApplyRowResult(_Model):
    """``applied`` is false when the row already had this version or a newer one."""

    applied: bool


class UndoCreatedRowInput(_Model):
    """Compensation: delete the row only if ``event_id`` inserted it."""

    user_id: str
    event_id: str


class InsertCreatedRowInput(_Model):
    """Insert the row of a ``created`` event (pending until its permissions are written)."""

    event: UserEvent
    # A new run's first event: read the user's App DB state first, in the same transaction, and
    # insert only if the App DB has never seen the user (``InsertCreatedRowResult.prior``).
    read_first: bool = False


class InsertCreatedRowResult(_Model):
    """``created``: this event inserted the row; ``stale``: a newer version already exists.

    With ``read_first``, ``prior`` is the user's state before the insert; ``skipped`` says the
    App DB already knew the user, so nothing was done and the event must be judged against it.
    """

    created: bool
    stale: bool
    prior: UserState | None = None
    skipped: bool = False


class ReadMembershipsInput(_Model):
    """Read the user's memberships and sync version marker from SpiceDB."""

    user_id: str


class WriteMembershipsInput(_Model):
    """One atomic WriteRelationships: remove, add, and move the version marker.

    ``expected_marker`` is the marker the write requires to find (a precondition; ``None``
    means "no marker yet"), so a write retried from an older attempt can never land after a
    newer one (SpiceDB issue #1503). Compensation restores a prior state unconditionally
    (``check_marker=False``).
    """

    user_id: str
    remove: list[Membership]
    add: list[Membership]
    expected_marker: int | None
    set_marker: int | None
    remove_marker: int | None
    check_marker: bool = True
    event_id: str = ""
    # Write only if SpiceDB holds exactly this (read inside the write, under the row's lock);
    # otherwise write nothing and return what it holds. Lets a sync plan from the state it
    # predicts from the App DB and skip a separate read step when the prediction is right.
    only_if: MembershipsSnapshot | None = None
    # Record this event on the App DB row in the same PostgreSQL transaction: the row is brought
    # to it before SpiceDB is written (a row that refuses it refuses it with nothing written),
    # and the write's ZedToken is stored with it. One step for both stores instead of two.
    record: UserEvent | None = None


class ResumeInput(_Model):
    """Input of the ``resume`` update: an operator fixed what parked the sync."""


class ResumeResult(_Model):
    """``resumed`` is false when the sync was not parked."""

    resumed: bool


# --- Reconciliation: repair through the per-user workflow ------------------------------------


class ReconcileUserInput(_Model):
    """Input of the ``reconcile`` update: make SpiceDB match the App DB for this one user.

    ``request_id`` names the reconcile run that asked (for the write's transaction metadata).
    """

    request_id: str


class ReconcileUserResult(_Model):
    """What the repair did: ``consistent`` means nothing needed writing."""

    # ``removed_unfinished``: a row left by a creation that never finished was removed, with
    # whatever SpiceDB held for the user.
    action: Literal["repaired", "consistent", "failed", "removed_unfinished"]
    removed: int = 0
    added: int = 0
    zed_token: str | None = None
    error_type: str | None = None


class RecordRepairInput(_Model):
    """Record a repaired user's ZedToken on the row, if the row is still at ``version``."""

    user_id: str
    version: int
    zed_token: str


# --- Reconciliation: the scan ----------------------------------------------------------------

DriftKind = Literal[
    "missing", "mismatched", "orphan", "unfinished", "unsynced", "extra", "unmappable"
]


class Drift(_Model):
    """One user whose SpiceDB relationships differ from the App DB.

    ``missing``: the user's membership is absent and nothing else is there; ``mismatched``: the
    user holds a membership the App DB does not give (wrong role or organization); ``orphan``:
    relationships of a user the App DB does not have (deleted, or never existed);
    ``unfinished``: a row spicesync inserted for a creation that never finished, with no event
    of the user's in flight (the repair removes it); ``unsynced``: a row spicesync never wrote
    (inserted by the app or by hand) whose membership is absent: ``spicesync backfill`` is the
    tool for many of those. ``deletions`` is the number of relationships a repair removes.

    In follow mode (docs/follow-mode.md) ``missing`` and ``unsynced`` mean relationships the row
    implies are absent (``unsynced``: spicesync has never synced the user); ``extra``: the user
    holds managed relationships the row does not imply; ``orphan``: no row, managed relationships
    held; ``unmappable``: the row maps to no valid relationship. There ``deletions`` counts only
    the relationships of users who would be left with none (what the prune cap guards).
    """

    user_id: str
    kind: DriftKind
    deletions: int = 0


class CheckSchemaInput(_Model):
    """Check SpiceDB's schema before a scan."""


class ScanAppDBPageInput(_Model):
    """One keyset page of the App DB's users, checked against SpiceDB."""

    after_user_id: str | None
    page_size: int
    # A pending creation row older than this, whose user has no sync in an active stage, is
    # drift (``unfinished``), not a live sync.
    unfinished_after_seconds: float = 60.0


class ScanSpiceDBPageInput(_Model):
    """One page of SpiceDB's organization relationships, checked against the App DB."""

    cursor: str | None
    page_size: int
    # As in :class:`ScanAppDBPageInput`.
    unfinished_after_seconds: float = 60.0


class ScanPageResult(_Model):
    """Drift found on one page, how much was scanned, and where the next page starts.

    ``next`` is ``None`` when the scan is complete. ``in_flight`` counts users skipped because a
    live sync of theirs is between its two writes.
    """

    drift: list[Drift]
    scanned: int
    in_flight: int = 0
    next: str | None
    # Follow mode: rows whose id cannot be a user's id (not opaque or SpiceDB-safe); counted as
    # unmappable but never named, since such an id may not be opaque.
    unusable_ids: int = 0


class RepairUsersInput(_Model):
    """Repair these users, each through its own per-user workflow."""

    request_id: str
    user_ids: list[str]


class RepairUsersResult(_Tally):
    """What the repairs did, summed."""

    repaired: int = 0
    consistent: int = 0
    failed: int = 0
    # Rows of creations that never finished, removed (with anything SpiceDB held for them).
    removed_unfinished: int = 0
    relationships_written: int = 0
    failed_samples: list[str] = []
    # Follow mode: changes delivered to the users' workflows, which then sync level-triggered.
    delivered: int = 0


class DriftCounts(_Tally):
    """Drift found, by kind."""

    missing: int = 0
    mismatched: int = 0
    orphan: int = 0
    unfinished: int = 0
    unsynced: int = 0
    # Follow mode's own kinds (see :class:`Drift`).
    extra: int = 0
    unmappable: int = 0

    def total(self) -> int:
        """Drifted users of every kind."""
        return (
            self.missing
            + self.mismatched
            + self.orphan
            + self.unfinished
            + self.unsynced
            + self.extra
            + self.unmappable
        )


class ReconcileInput(_Model):
    """Input of the reconcile workflow; ``progress`` is set when it continues as new."""

    dry_run: bool = True
    # At most this many relationships deleted per run; a run that would delete more deletes
    # none and says so.
    prune_cap: int = Field(default=1000, ge=0)
    page_size: int = Field(default=1000, ge=1, le=RECONCILE_PAGE_SIZE_MAX)
    # How long a creation's pending row may wait for its sync before it counts as unfinished.
    unfinished_after_seconds: float = Field(default=60.0, ge=0)
    # Pages one run scans before it continues as new with a fresh history.
    pages_per_run: int = 40
    # Follow mode: scan the application's table through the mapping and repair by delivering
    # changes to the users' workflows (the starters set it when a mapping is configured).
    follow: bool = False
    progress: ReconcileProgress | None = None


class ReconcileProgress(_Tally):
    """Where a reconcile is, carried across continue-as-new and shown by its query."""

    phase: Literal["app_db", "spicedb", "prune", "done"] = "app_db"
    app_cursor: str | None = None
    spicedb_cursor: str | None = None
    found: DriftCounts = DriftCounts()
    samples: dict[str, list[str]] = {}
    # Deletion-bearing repairs wait for the end of the scan (so the prune cap can be judged);
    # at most ``prune_cap + 1`` are kept: beyond that the run prunes nothing anyway.
    deferred: list[Drift] = []
    deletions_planned: int = 0
    rows_scanned: int = 0
    relationships_scanned: int = 0
    in_flight_skipped: int = 0
    repairs: RepairUsersResult = RepairUsersResult()
    started_at: str = ""
    app_db_scan_seconds: float = 0.0
    spicedb_scan_seconds: float = 0.0
    repair_seconds: float = 0.0


class ReconcileReport(_Model):
    """The result of a reconcile run: counts, samples of opaque ids, rates."""

    dry_run: bool
    found: DriftCounts
    samples: dict[str, list[str]]
    rows_scanned: int
    relationships_scanned: int
    in_flight_skipped: int
    repairs: RepairUsersResult
    deletions_planned: int
    prune_cap: int
    prune_cap_exceeded: bool
    rows_scanned_per_second: float
    relationships_scanned_per_second: float
    relationships_written_per_second: float
    seconds: float
    message: str


class SaveReportInput(_Model):
    """Keep a finished run's report in the App DB."""

    workflow_id: str
    run_id: str
    report: ReconcileReport


# --- Backfill ---------------------------------------------------------------------------------


class BackfillInput(_Model):
    """Input of the backfill workflow; ``progress`` is set when it continues as new."""

    batch_size: int = Field(default=BACKFILL_BATCH_SIZE_MAX, ge=1, le=BACKFILL_BATCH_SIZE_MAX)
    # Users per second at most (0: as fast as it goes); a durable timer paces the batches.
    max_rate: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Disjoint ranges of the id space written side by side: one lane's PostgreSQL work overlaps
    # another's SpiceDB write.
    lanes: int = Field(default=1, ge=1, le=BACKFILL_LANES_MAX)
    batches_per_run: int = 200
    # Follow mode: deliver a change to every row's user spicesync has never synced (one lane:
    # the application's ids need not be UUIDs).
    follow: bool = False
    progress: BackfillProgress | None = None


class BackfillProgress(_Tally):
    """Where a backfill is; carried across continue-as-new and shown by its query."""

    cursor: str | None = None
    # Per lane, when there is more than one: where it is, and whether it is finished.
    lane_cursors: list[str | None] = []
    lanes_done: list[bool] = []
    total: int = 0
    scanned: int = 0
    written_users: int = 0
    skipped: int = 0
    relationships_written: int = 0
    # Follow mode: changes delivered to the users' workflows.
    delivered: int = 0
    busy_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    done: bool = False
    # Decided once, at the start (see ``BackfillPageInput.version_markers``).
    version_markers: bool = True


class CountBackfillInput(_Model):
    """Count the users a backfill has to write."""


class CountUncheckedSyncsInput(_Model):
    """Count the running user syncs that may write SpiceDB without first checking it.

    Those are runs begun by a release before the write that checks SpiceDB under the row's lock.
    """

    task_queue: str
    # ``TemporalChangeVersion`` values of runs that do check (workflows/steps.py).
    checked_markers: list[str]


class BackfillPageInput(_Model):
    """Write one keyset batch of never-synced users to SpiceDB."""

    after_user_id: str | None
    batch_size: int
    request_id: str
    # The lane's upper bound (exclusive); ``None``: the end of the id space.
    before_user_id: str | None = None
    # Write each user's version marker too: needed while a sync that does not check SpiceDB
    # under the row's lock may be running (the default, for batches scheduled before the check).
    version_markers: bool = True


class BackfillPageResult(_Model):
    """What one batch did, and where the next starts (``None``: finished)."""

    scanned: int
    written_users: int
    skipped: int
    relationships_written: int
    zed_token: str | None
    next: str | None
    # Follow mode: changes delivered to the users' workflows.
    delivered: int = 0


class BackfillResult(_Model):
    """The finished backfill's figures."""

    progress: BackfillProgress
    rows_scanned_per_second: float
    relationships_written_per_second: float


# --- Follow mode's reconcile and backfill (same workflows, the mapping's activities) ---------


class ScanFollowedRowsInput(_Model):
    """One keyset page of the application's table, through the mapping, checked against SpiceDB."""

    # The last id of the previous page, as text; ``None``: the first page.
    after_user_id: str | None
    page_size: int


class ScanFollowedRelationshipsInput(_Model):
    """One page of SpiceDB's managed relationships, checked against the application's table."""

    # Where the scan is (a managed resource type and SpiceDB's cursor in it); ``None``: the start.
    cursor: str | None
    page_size: int


class DeliverRepairsInput(_Model):
    """Deliver a change (source ``reconcile``) to each of these users' workflows."""

    user_ids: list[str]


class CountFollowedBackfillInput(_Model):
    """Count the rows whose user spicesync has never synced."""


class FollowBackfillPageInput(_Model):
    """Deliver a change (source ``backfill``) to one keyset page of never-synced rows' users."""

    after_user_id: str | None
    batch_size: int


ReconcileInput.model_rebuild()
BackfillInput.model_rebuild()


# Follow mode (docs/follow-mode.md): spicesync follows the application's own users table.

FollowSyncStatus = Literal["synced", "unchanged", "skipped", "failed"]


class UserChangedInput(_Model):
    """A "user X changed" event: the ``user_changed`` signal and the ``sync_change`` update.

    It says nothing of what changed: the user's workflow reads the row as it is now, so a
    duplicate, late or out-of-order change is harmless.
    """

    user_id: str
    # The row's version after the change, when the mapping names a version column: a change not
    # newer than what is applied needs no sync.
    version: int | None = None
    # Where the change came from in its feed (a WAL position, a stream sequence), for audits.
    position: str | None = None
    # Who delivered it: "app", "outbox", "cdc", "nats", "reconcile", "backfill".
    source: str = "app"


class FollowCarried(_Model):
    """What one run of a followed user's workflow hands to the next."""

    synced_version: int | None = None
    # The ZedToken of the last sync, given to a caller whose change needed no sync.
    zed_token: str | None = None
    # A change arrived and was not synced yet when the run continued as new.
    pending: bool = False


class FollowedUserInput(_Model):
    """Input of a followed user's workflow; ``carried`` is set when it continues as new."""

    user_id: str
    idle_seconds: float = 600.0
    syncs_per_run: int = EVENTS_PER_RUN
    carried: FollowCarried | None = None


class SyncFollowedUserInput(_Model):
    """Input of ``sync_followed_user``: make SpiceDB match the user's row as it is now."""

    user_id: str
    # Recorded as transaction metadata on the SpiceDB write, with the workflow's ids.
    sync_id: str
    position: str | None = None


class SyncFollowedUserResult(_Model):
    """What one sync did (counts and opaque ids only, never the row's values)."""

    status: Literal["synced", "unchanged"]
    row_exists: bool
    version: int | None = None
    added: int = 0
    removed: int = 0
    marker: int | None = None
    zed_token: str


class RecordFollowFailureInput(_Model):
    """Input of ``record_follow_failure``: a sync failed for good; say so in the bookkeeping."""

    user_id: str
    error_type: str
    message: str


class FollowSyncOutcome(_Model):
    """What a caller of ``sync_change`` learns."""

    user_id: str
    status: FollowSyncStatus
    version: int | None = None
    zed_token: str | None = None
    error_type: str | None = None
    message: str | None = None
