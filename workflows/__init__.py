"""Workflows: one module per business process."""

from workflows.create_user import CreateUserWorkflow

__all__ = ["CreateUserWorkflow"]
