"""Load as an application produces it: events offered, retried until accepted, then awaited.

An event counts as *accepted* once a start call returned (Temporal recorded it); a call that
failed on the way (Temporal down, a timeout) is retried the way an app retries, which is safe
because a re-delivered event is a no-op. Outcomes are collected by delivering the same event
again and waiting for permissions: a duplicate gets the first delivery's outcome.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from temporalio.client import Client

from spicesync.errors import InvalidUserInput
from spicesync.models import CreateUserInput
from starters.user_events import UserSyncFailed, WaitFor, create_user

__all__ = ["Delivery", "collect_outcomes", "offer", "user_batch"]

# An app's retry of a failed start call: short pauses, bounded in total.
_RETRY_PAUSE = 0.5


def user_batch(run: str, count: int, *, org_id: str) -> list[CreateUserInput]:
    """``count`` valid, distinct users of one organization."""
    return [
        CreateUserInput(
            user_id=str(uuid.uuid4()),
            email=f"c{i}-{run}@chaos.example.com",
            name=f"Chaos user {i}",
            org_id=org_id,
            role="admin" if i % 5 == 0 else "member",
        )
        for i in range(count)
    ]


@dataclass
class Delivery:
    """What the load saw: accepted users, rejections, and the calls that had to be retried."""

    accepted: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    retried_calls: int = 0
    failed_calls: int = 0


async def offer(
    client: Client,
    task_queue: str,
    users: list[CreateUserInput],
    *,
    concurrency: int = 64,
    give_up_after: float = 180.0,
    on_accept: Callable[[int], Awaitable[None]] | None = None,
    delivery: Delivery | None = None,
    wait: WaitFor = WaitFor.START,
) -> Delivery:
    """Offer every user's creation; return once each is accepted, rejected, or given up.

    Args:
        client: The app's Temporal client.
        task_queue: The workers' queue.
        users: The events.
        concurrency: Start calls in flight at once.
        give_up_after: Seconds one event may keep failing before it counts as a failed call.
        on_accept: Called with the number accepted so far, after each acceptance (fault hooks).
        delivery: Accumulate into this record (a scenario that offers in several waves).
        wait: How the app waits: ``START`` (durable at the server's answer), or ``ACCEPTED``
            as an app of a release before ``WaitFor.START`` became a signal did.
    """
    record = delivery if delivery is not None else Delivery()
    gate = asyncio.Semaphore(concurrency)

    async def one(user: CreateUserInput) -> None:
        async with gate:
            deadline = time.monotonic() + give_up_after
            while True:
                try:
                    await create_user(user, wait=wait, client=client, task_queue=task_queue)
                except InvalidUserInput as err:
                    record.rejected[user.user_id] = f"InvalidUserInput: {err.message}"
                    return
                except UserSyncFailed as err:
                    # Already decided (a duplicate of a failed event): accepted, outcome known.
                    record.accepted.setdefault(user.user_id, time.monotonic())
                    record.rejected.setdefault(user.user_id, err.error_type)
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        record.failed_calls += 1
                        return
                    record.retried_calls += 1
                    await asyncio.sleep(_RETRY_PAUSE)
                    continue
                record.accepted.setdefault(user.user_id, time.monotonic())
                if on_accept is not None:
                    await on_accept(len(record.accepted))
                return

    await asyncio.gather(*(one(u) for u in users))
    return record


async def collect_outcomes(
    client: Client,
    task_queue: str,
    users: list[CreateUserInput],
    *,
    concurrency: int = 64,
    timeout: float = 300.0,
) -> dict[str, str]:
    """Wait for each user's final outcome: ``synced``, ``failed:<type>`` or ``unfinished``."""
    gate = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + timeout
    outcomes: dict[str, str] = {}

    async def one(user: CreateUserInput) -> None:
        async with gate:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    outcomes[user.user_id] = "unfinished"
                    return
                try:
                    result = await asyncio.wait_for(
                        create_user(user, client=client, task_queue=task_queue), left
                    )
                except UserSyncFailed as err:
                    outcomes[user.user_id] = f"failed:{err.error_type}"
                    return
                except TimeoutError:
                    outcomes[user.user_id] = "unfinished"
                    return
                except Exception:
                    await asyncio.sleep(_RETRY_PAUSE)
                    continue
                outcomes[user.user_id] = "synced" if result.status == "synced" else result.status
                return

    await asyncio.gather(*(one(u) for u in users))
    return outcomes
