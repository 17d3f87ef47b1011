"""Open-loop load: requests are sent at a fixed offered rate whether or not earlier ones finished.

A closed loop (send the next request when one completes) hides overload: the system sets its own
pace. Here request ``i`` is due at ``t0 + i / rate``; its start-call latency is measured by the
caller, and the moments its row and its permissions became true are read afterwards from the
stores themselves (``users.created_at`` and ``users.synced_at``, written by every system), so
measuring adds no load while the system runs.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Set as AbstractSet
from dataclasses import dataclass, field

import asyncpg

from spicesync.models import CreateUserInput

__all__ = [
    "USERS_SYNCED",
    "Accounting",
    "CellResult",
    "Percentiles",
    "account",
    "new_user",
    "percentiles",
    "run_open_loop",
    "wait_done",
]


def new_user(run: str, i: int) -> CreateUserInput:
    """The ``i``-th user of a run: fresh ids, an organization shared by 50 users."""
    user_id = str(uuid.uuid4())
    return CreateUserInput(
        user_id=user_id,
        email=f"b-{user_id[:13]}@example.com",
        name="Bench User",
        org_id=f"bench-{run}-{i // 50}",
        role="admin" if i % 10 == 0 else "member",
    )


@dataclass(frozen=True)
class Percentiles:
    """p50, p95 and p99 of one measure, in milliseconds (``None`` with no samples)."""

    p50: float | None
    p95: float | None
    p99: float | None

    def as_dict(self) -> dict[str, float | None]:
        """JSON-ready."""
        return {"p50": self.p50, "p95": self.p95, "p99": self.p99}


def percentiles(samples_ms: list[float]) -> Percentiles:
    """Nearest-rank percentiles."""
    if not samples_ms:
        return Percentiles(None, None, None)
    ordered = sorted(samples_ms)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return Percentiles(round(statistics.median(ordered), 1), rank(0.95), rank(0.99))


@dataclass
class CellResult:
    """One system at one offered rate."""

    system: str
    offered_rate: float
    seconds: float
    submitted: int = 0
    failed_calls: int = 0
    # How long the calls that raised took: an admission refusal must be quick (issue 16).
    failed_call: Percentiles = field(default_factory=lambda: Percentiles(None, None, None))
    completed: int = 0
    not_done: int = 0
    late: int = 0
    completed_per_second: float = 0.0
    start_call: Percentiles = field(default_factory=lambda: Percentiles(None, None, None))
    time_to_row: Percentiles = field(default_factory=lambda: Percentiles(None, None, None))
    time_to_permission: Percentiles = field(default_factory=lambda: Percentiles(None, None, None))
    lost: int = 0
    # Milliseconds of CPU per completed user, by process role and in "total" (bench/cpu.py).
    cpu_ms_per_user: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "system": self.system,
            "offered_rate": self.offered_rate,
            "seconds": self.seconds,
            "submitted": self.submitted,
            "failed_calls": self.failed_calls,
            "failed_call_ms": self.failed_call.as_dict(),
            "completed": self.completed,
            "not_done": self.not_done,
            "late": self.late,
            "lost": self.lost,
            "completed_per_second": self.completed_per_second,
            "start_call_ms": self.start_call.as_dict(),
            "time_to_row_ms": self.time_to_row.as_dict(),
            "time_to_permission_ms": self.time_to_permission.as_dict(),
            "cpu_ms_per_user": self.cpu_ms_per_user,
        }


@dataclass(frozen=True)
class Accounting:
    """Where each offered user ended; every count is a number of distinct users.

    ``completed``: the system finished the user within the drain (a call that raised may still
    have been accepted and finished: it counts here). ``not_done``: the call was accepted, the
    user was not finished at the end of the drain. ``late``: of those, the users that finished
    during the settle after it (queued, not dropped). ``lost``: accepted, and not finished even
    after the settle, or (for systems that keep rows) not granted in SpiceDB. A user whose call
    raised and who never finished is in none of these: the app was told it failed.
    """

    submitted: int
    failed_calls: int
    completed: int
    not_done: int
    late: int
    lost: int


def account(
    offered: list[str],
    *,
    failed: set[str],
    done: set[str],
    late: AbstractSet[str] = frozenset(),
    holding: set[str] | None,
) -> Accounting:
    """Sort the offered users into the counts of :class:`Accounting`.

    Args:
        offered: Every user id offered to the system.
        failed: The users whose start call raised.
        done: The users the system finished within the drain (read from the stores).
        late: The users it finished after the drain, during the settle.
        holding: The users SpiceDB grants (read after the settle), for systems that keep rows;
            ``None`` otherwise.
    """
    accepted = [u for u in offered if u not in failed]
    unfinished = [u for u in accepted if u not in done]
    ever = done | late
    if holding is None:
        lost = sum(1 for u in accepted if u not in ever)
    else:
        lost = sum(1 for u in accepted if u not in ever or u not in holding)
    return Accounting(
        submitted=len(offered),
        failed_calls=len(failed),
        completed=sum(1 for u in offered if u in done),
        not_done=len(unfinished),
        late=sum(1 for u in unfinished if u in late),
        lost=lost,
    )


async def run_open_loop(
    submit: Callable[[CreateUserInput], Awaitable[None]],
    users: list[CreateUserInput],
    rate: float,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], list[float], dict[str, float]]:
    """Offer ``users`` at ``rate`` per second.

    Returns:
        When each user's call was sent (epoch seconds, by user id), the start-call latencies in
        milliseconds, and the users whose call raised, with how long each took to raise.
    """
    sent: dict[str, float] = {}
    latencies: list[float] = []
    failed: dict[str, float] = {}
    began = time.monotonic()

    async def one(user: CreateUserInput) -> None:
        sent[user.user_id] = time.time()
        t = time.perf_counter()
        try:
            await submit(user)
        except Exception:
            failed[user.user_id] = (time.perf_counter() - t) * 1000
            return
        latencies.append((time.perf_counter() - t) * 1000)

    tasks: list[asyncio.Task[None]] = []
    for i, user in enumerate(users):
        due = began + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(user)))
        if progress is not None and i % max(1, int(rate)) == 0:
            progress(i, len(users))
    await asyncio.gather(*tasks)
    return sent, latencies, failed


USERS_SYNCED = "SELECT count(*) FROM users WHERE id = ANY($1::uuid[]) AND synced_at IS NOT NULL"


async def wait_done(
    pool: asyncpg.Pool, user_ids: list[str], timeout: float, *, synced_query: str = USERS_SYNCED
) -> int:
    """Wait until every user is synced, or ``timeout``; returns how many are not.

    Args:
        pool: The benchmark's database.
        user_ids: The users.
        timeout: Seconds.
        synced_query: Counts the synced users among ``$1`` (``uuid[]``); by default from the
            ``users`` table every owned-mode system writes.
    """
    ids = [uuid.UUID(u) for u in user_ids]
    deadline = time.monotonic() + timeout
    while True:
        done = await pool.fetchval(synced_query, ids)
        if done == len(ids) or time.monotonic() > deadline:
            return len(ids) - int(done)
        await asyncio.sleep(0.25)
