"""`spicesync reconcile` and `backfill` show progress by querying the run; a query no worker
answers (every worker restarting or draining after SIGTERM) must not end the command."""

from __future__ import annotations

from typing import Any

from temporalio.service import RPCError, RPCStatusCode

from spicesync.cli.maintenance import _query_progress


class _Handle:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.timeouts: list[float] = []

    async def query(self, query: Any, *, rpc_timeout: Any) -> Any:
        self.timeouts.append(rpc_timeout.total_seconds())
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


async def test_no_worker_to_answer_means_no_progress_line_not_a_crash() -> None:
    unanswered = _Handle(RPCError("no poller", RPCStatusCode.DEADLINE_EXCEEDED, b""))
    assert await _query_progress(unanswered, "progress") is None  # type: ignore[arg-type]
    answered = _Handle({"phase": "repairing"})
    assert await _query_progress(answered, "progress") == {"phase": "repairing"}  # type: ignore[arg-type]
    # Bounded: the loop keeps waiting for the result instead of for one query.
    assert unanswered.timeouts == [5.0]
