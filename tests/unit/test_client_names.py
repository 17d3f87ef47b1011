"""The client reaches the user's workflow by name: the names must be the workflow's own."""

from __future__ import annotations

from temporalio.workflow import _Definition

from spicesync.constants import SUBMIT_EVENT_UPDATE, USER_SYNC_WORKFLOW
from workflows.user_sync import UserSyncWorkflow


def test_the_workflow_is_registered_under_the_clients_name() -> None:
    definition = _Definition.must_from_class(UserSyncWorkflow)
    assert definition.name == USER_SYNC_WORKFLOW
    # The update the client sends is the workflow's ``submit`` method, under the client's name.
    assert definition.updates[SUBMIT_EVENT_UPDATE].fn is UserSyncWorkflow.submit


def test_the_client_imports_no_workflow_code() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, spicesync.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'workflows', 'activities', 'workers', 'starters', 'bench', 'chaos', 'asyncpg',"
        " 'authzed', 'matplotlib'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
