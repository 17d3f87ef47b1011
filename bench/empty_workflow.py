"""A workflow that does nothing: the ceiling the pipeline is measured against."""

from __future__ import annotations

from temporalio import workflow

__all__ = ["EmptyWorkflow"]


@workflow.defn
class EmptyWorkflow:
    """Starts and completes: one workflow task, nothing else."""

    @workflow.run
    async def run(self, user_id: str) -> str:
        """Return the id it was given."""
        return user_id
