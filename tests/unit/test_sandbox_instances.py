"""What the workflow sandbox executes again for each new workflow instance stays small."""

from __future__ import annotations

import subprocess
import sys

import pytest
from temporalio.worker import UnsandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from bench.sandbox_instances import WORKFLOWS, instance_cost, instance_details


def test_the_workflows_package_imports_no_workflow() -> None:
    # The sandbox executes the package again before any workflow's module, for every instance.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, workflows; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'workflows'" in loaded
    assert "workflows." not in loaded


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
async def test_a_new_instance_executes_only_the_package_and_its_own_module_again(
    name: str,
) -> None:
    cls = WORKFLOWS[name]
    instance = SandboxedWorkflowRunner().create_instance(instance_details(cls))
    in_sandbox = instance.importer.new_modules  # type: ignore[attr-defined]
    # Any module of ours the sandbox holds that is not the host's was executed again for it.
    executed_again = {
        module
        for module, loaded in in_sandbox.items()
        if module.split(".")[0] in {"workflows", "activities", "spicesync"}
        and loaded is not sys.modules.get(module)
    }
    assert executed_again == {"workflows", cls.__module__}
    if cls.__module__ == "workflows.user_sync":
        assert (
            in_sandbox["workflows.user_sync_helpers"] is sys.modules["workflows.user_sync_helpers"]
        )


async def test_every_workflow_is_instantiated_by_both_runners() -> None:
    for cls in WORKFLOWS.values():
        for runner in (SandboxedWorkflowRunner(), UnsandboxedWorkflowRunner()):
            assert instance_cost(runner, cls, instances=1, rounds=1) > 0
