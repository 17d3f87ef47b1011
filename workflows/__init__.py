"""Workflows: one module per business process."""

from workflows.user_sync import UserSyncWorkflow

__all__ = ["UserSyncWorkflow"]
