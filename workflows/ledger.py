"""Per-user event bookkeeping for the per-user workflow: pure, deterministic, tested alone.

The ledger decides which event to apply next and remembers what became of each event id:

* a duplicate (the same event id with the same content) gets the outcome of the first delivery
  (or waits for it); the same event id with different content is a conflict: that delivery is
  answered ``EventIdConflict`` and the first event's outcome stands;
* an event whose version is not newer than the applied version is *stale*: recorded, not applied;
* pending events are applied lowest version first, one at a time;
* an event is *stale* once an event of the same or a higher version has been decided (applied
  or failed): decisions are taken in strictly increasing version order;
* a change to a user that does not exist (not yet created, or deleted) is held until a
  ``created`` or ``deleted`` event can be applied before it; the workflow gives a held change a
  grace period (a durable timer), then :meth:`EventLedger.expire_held` fails it. A change whose
  version comes right after the last decided one, to a user that is gone (deleted, or whose
  creation failed), fails at once: no creation can come between.

The ledger keeps a digest of each decided event's content, never the content itself, so what it
remembers (carried across continue-as-new) holds no email or name; see :func:`content_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict

from spicesync.errors import EventIdConflict
from spicesync.models import EventOutcome, UserEvent, UserState
from workflows.user_sync_helpers import failed as _failed

__all__ = ["EventLedger", "content_digest"]

_ENTRY_KINDS = frozenset({"created", "deleted"})


def content_digest(event: UserEvent) -> str:
    """A digest of everything ``event`` says, to tell a duplicate from a reused event id.

    HMAC-SHA256 keyed by the event's own ids over its canonical JSON (fields left at their
    defaults omitted, so a field added to :class:`UserEvent` later does not change the digest
    of an event that does not use it). A plain hash of an email can be confirmed by hashing
    guesses; keying by the ids stops tables built once for every user, though not a guess aimed
    at one event. That is acceptable because the digest lives only where the event itself does:
    in the workflow's state, history and update results, all encrypted by the payload codec.
    It must never go into a search attribute, a workflow id, a log line or a metric.

    Args:
        event: The event as delivered.

    Returns:
        64 hex characters.
    """
    content = json.dumps(
        event.model_dump(exclude_defaults=True),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    key = f"spicesync-event-v1\0{event.user_id}\0{event.event_id}".encode()
    return hmac.new(key, content.encode(), hashlib.sha256).hexdigest()


class EventLedger:
    """Which events of one user are pending, and what became of the others.

    ``legacy`` keeps the rules of runs recorded before reused event ids were refused and changes
    to a user that is gone failed at once, so that their histories replay: the new rules could
    have answered, waited and applied differently there (other workflow commands).
    """

    def __init__(
        self,
        state: UserState,
        recent: list[EventOutcome] | None = None,
        *,
        remember: int = 1000,
        legacy: bool = False,
    ) -> None:
        self.state = state
        self._legacy = legacy
        # Set by ``abandon(..., refuse_later=True)``: the failure every later event gets.
        self._refusal: tuple[str, str] | None = None
        self._pending: dict[str, UserEvent] = {}
        self._outcomes: OrderedDict[str, EventOutcome] = OrderedDict(
            (o.event_id, o) for o in (recent or [])
        )
        self._remember = remember
        self._high_water = state.version

    def offer(self, event: UserEvent) -> EventOutcome | None:
        """Take a delivered event.

        Returns:
            The event's final outcome if it is already decided (a duplicate of a finished event,
            a stale one, or a change to a user that is gone), or an ``EventIdConflict`` failure
            (not recorded: the first event's outcome stands) if the id was used for other content;
            ``None`` if it is queued (or a duplicate of a queued one).
        """
        digest = content_digest(event)
        if (known := self._outcomes.get(event.event_id)) is not None:
            # Outcomes carried over from a run before digests were kept have none: a duplicate.
            if known.content_digest not in (None, digest) and not self._legacy:
                return _conflict(event)
            return known
        if self._refusal is not None:
            error_type, message = self._refusal
            return self._record(_failed(event, error_type, message), event)
        if (queued := self._pending.get(event.event_id)) is not None:
            same = self._legacy or content_digest(queued) == digest
            return None if same else _conflict(event)
        if event.event_id == self.state.applied_event and not (
            self._legacy or _records(self.state, event)
        ):
            return _conflict(event)
        if event.event_id == self.state.applied_event and event.version == self.state.version:
            # This event id is what the App DB records as applied (delivered again after the
            # workflow closed, or replayed after a worker died mid-task). The row keeps no copy
            # of the event, so it was compared above with what it does keep: version, and
            # membership or deletion.
            return self._record(
                EventOutcome(
                    event_id=event.event_id,
                    version=event.version,
                    status="applied",
                    zed_token=self.state.zed_token,
                ),
                event,
            )
        if event.version <= self._high_water:
            return self._record(
                EventOutcome(event_id=event.event_id, version=event.version, status="stale"),
                event,
            )
        self._pending[event.event_id] = event
        self._fail_hopeless()
        return self._outcomes.get(event.event_id)

    def next_ready(self) -> UserEvent | None:
        """The event to apply now, or ``None`` if nothing can be applied yet (pure)."""
        ordered = sorted(self._pending.values(), key=lambda e: (e.version, e.event_id))
        if not ordered:
            return None
        if self.state.exists or ordered[0].kind in _ENTRY_KINDS:
            return ordered[0]
        return next((e for e in ordered if e.kind in _ENTRY_KINDS), None)

    def finish(self, event: UserEvent, outcome: EventOutcome, state: UserState) -> None:
        """Record the outcome of an applied (or failed) event and the user's new state.

        Pending events the new state has overtaken become stale here; a held change that can
        no longer find its user fails (see :meth:`offer`).
        """
        self._decide(event, outcome, state)
        self._fail_hopeless()

    def refresh(self, state: UserState) -> None:
        """Adopt the user's state as read afresh from the App DB (by a repair).

        The high-water version never goes back: an event not newer than one already decided
        stays stale even if the App DB was restored from an older backup.
        """
        self.state = state
        self._high_water = max(self._high_water, state.version)
        self._fail_hopeless()

    def expire_held(self) -> EventOutcome | None:
        """Fail the lowest held change (its grace period ran out); ``None`` if none is held."""
        if self.next_ready() is not None or not self._pending:
            return None
        held = min(self._pending.values(), key=lambda e: (e.version, e.event_id))
        outcome = _not_found(held)
        self.finish(held, outcome, self.state)
        return outcome

    def abandon(self, error_type: str, message: str, *, refuse_later: bool = False) -> None:
        """Fail every pending event (the workflow is being cancelled).

        Args:
            error_type: The failure's type.
            message: What the callers are told.
            refuse_later: Fail every event offered from now on too (events delivered before the
                run knew the user's state are offered only once it is cancelled).
        """
        for event in list(self._pending.values()):
            del self._pending[event.event_id]
            self._record(_failed(event, error_type, message), event)
        if refuse_later:
            self._refusal = (error_type, message)

    def is_holding(self) -> bool:
        """True if events are pending but none can be applied yet."""
        return bool(self._pending) and self.next_ready() is None

    def outcome(self, event_id: str) -> EventOutcome | None:
        """The final outcome of ``event_id``, if decided."""
        return self._outcomes.get(event_id)

    def has_pending(self) -> bool:
        """True while any delivered event is not decided yet."""
        return bool(self._pending)

    def recent(self) -> list[EventOutcome]:
        """The remembered outcomes, oldest first (carried across continue-as-new)."""
        return list(self._outcomes.values())

    def _decide(self, event: UserEvent, outcome: EventOutcome, state: UserState) -> None:
        self._pending.pop(event.event_id, None)
        self.state = state
        self._high_water = max(self._high_water, event.version)
        self._record(outcome, event)
        for overtaken in [e for e in self._pending.values() if e.version <= self._high_water]:
            del self._pending[overtaken.event_id]
            self._record(
                EventOutcome(
                    event_id=overtaken.event_id, version=overtaken.version, status="stale"
                ),
                overtaken,
            )

    def _fail_hopeless(self) -> None:
        """Fail, without a grace period, each held change that can never find its user.

        The user is gone (deleted, or its creation failed: something was decided, and it does
        not exist), and the lowest pending event is a change whose version comes right after
        the last decided one: no ``created`` event can come between, so waiting is pointless.
        With a gap in the versions a re-creation may still be on its way, so the change keeps
        its grace; so does a change to a user of whom nothing was decided yet (never created).
        """
        if self._legacy:
            return
        while not self.state.exists and self._high_water > 0 and self._pending:
            lowest = min(self._pending.values(), key=lambda e: (e.version, e.event_id))
            if lowest.kind in _ENTRY_KINDS or lowest.version != self._high_water + 1:
                return
            self._decide(lowest, _not_found(lowest), self.state)

    def _record(self, outcome: EventOutcome, event: UserEvent) -> EventOutcome:
        outcome = outcome.model_copy(update={"content_digest": content_digest(event)})
        self._outcomes[outcome.event_id] = outcome
        self._outcomes.move_to_end(outcome.event_id)
        while len(self._outcomes) > self._remember:
            self._outcomes.popitem(last=False)
        return outcome


def _records(state: UserState, event: UserEvent) -> bool:
    """True if the App DB's state is what applying ``event`` leaves behind."""
    if event.version != state.version:
        return False
    if event.kind == "deleted":
        return not state.exists
    return state.exists and (state.org_id, state.role) == (event.org_id, event.role)


def _conflict(event: UserEvent) -> EventOutcome:
    return EventOutcome(
        event_id=event.event_id,
        version=event.version,
        status="failed",
        error_type=EventIdConflict.__name__,
        message=(
            f"event id {event.event_id} was already used for an event with different content;"
            " this delivery was not applied"
        ),
    )


def _not_found(event: UserEvent) -> EventOutcome:
    return EventOutcome(
        event_id=event.event_id,
        version=event.version,
        status="failed",
        error_type="UserNotFound",
        message=f"user {event.user_id} does not exist at version {event.version}",
    )
