"""Per-user event bookkeeping for the per-user workflow: pure, deterministic, tested alone.

The ledger decides which event to apply next and remembers what became of each event id:

* a duplicate event id gets the outcome of the first delivery (or waits for it);
* an event whose version is not newer than the applied version is *stale*: recorded, not applied;
* pending events are applied lowest version first, one at a time;
* an event is *stale* once an event of the same or a higher version has been decided (applied
  or failed): decisions are taken in strictly increasing version order;
* a change to a user that does not exist (not yet created, or deleted) is held until a
  ``created`` or ``deleted`` event can be applied before it; the workflow gives a held change a
  grace period (a durable timer), then :meth:`EventLedger.expire_held` fails it.
"""

from __future__ import annotations

from collections import OrderedDict

from spicesync.models import EventOutcome, UserEvent, UserState

__all__ = ["EventLedger"]

_ENTRY_KINDS = frozenset({"created", "deleted"})


class EventLedger:
    """Which events of one user are pending, and what became of the others."""

    def __init__(
        self, state: UserState, recent: list[EventOutcome] | None = None, *, remember: int = 1000
    ) -> None:
        self.state = state
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
            or a stale one); ``None`` if it is queued (or a duplicate of a queued one).
        """
        if (known := self._outcomes.get(event.event_id)) is not None:
            return known
        if event.event_id in self._pending:
            return None
        if event.event_id == self.state.applied_event and event.version == self.state.version:
            # This very event is what the App DB records as applied (delivered again after the
            # workflow closed, or replayed after a worker died mid-task): answer as it was.
            return self._record(
                EventOutcome(
                    event_id=event.event_id,
                    version=event.version,
                    status="applied",
                    zed_token=self.state.zed_token,
                )
            )
        if event.version <= self._high_water:
            return self._record(
                EventOutcome(event_id=event.event_id, version=event.version, status="stale")
            )
        self._pending[event.event_id] = event
        return None

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

        Pending events the new state has overtaken become stale here.
        """
        self._pending.pop(event.event_id, None)
        self.state = state
        self._high_water = max(self._high_water, event.version)
        self._record(outcome)
        for overtaken in [e for e in self._pending.values() if e.version <= self._high_water]:
            del self._pending[overtaken.event_id]
            self._record(
                EventOutcome(event_id=overtaken.event_id, version=overtaken.version, status="stale")
            )

    def refresh(self, state: UserState) -> None:
        """Adopt the user's state as read afresh from the App DB (by a repair).

        The high-water version never goes back: an event not newer than one already decided
        stays stale even if the App DB was restored from an older backup.
        """
        self.state = state
        self._high_water = max(self._high_water, state.version)

    def expire_held(self) -> EventOutcome | None:
        """Fail the lowest held change (its grace period ran out); ``None`` if none is held."""
        if self.next_ready() is not None or not self._pending:
            return None
        held = min(self._pending.values(), key=lambda e: (e.version, e.event_id))
        outcome = EventOutcome(
            event_id=held.event_id,
            version=held.version,
            status="failed",
            error_type="UserNotFound",
            message=f"user {held.user_id} does not exist at version {held.version}",
        )
        self.finish(held, outcome, self.state)
        return outcome

    def abandon(self, error_type: str, message: str) -> None:
        """Fail every pending event (the workflow is being cancelled)."""
        for event in list(self._pending.values()):
            del self._pending[event.event_id]
            self._record(
                EventOutcome(
                    event_id=event.event_id,
                    version=event.version,
                    status="failed",
                    error_type=error_type,
                    message=message,
                )
            )

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

    def _record(self, outcome: EventOutcome) -> EventOutcome:
        self._outcomes[outcome.event_id] = outcome
        self._outcomes.move_to_end(outcome.event_id)
        while len(self._outcomes) > self._remember:
            self._outcomes.popitem(last=False)
        return outcome
