"""Workflows: one module per business process.

Import each workflow from its own module (``from workflows.user_sync import UserSyncWorkflow``).
This package imports nothing on purpose: the workflow sandbox executes it again for every new
workflow instance, before the workflow's module, so whatever it imported would be paid per user.
"""

__all__: list[str] = []
