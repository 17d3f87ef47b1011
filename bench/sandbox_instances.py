"""What a new workflow instance costs the worker, with and without the SDK's sandbox.

Every user's first event creates a new instance of the user's workflow; inside the sandbox that
means re-executing the workflow's module (and any of its imports not passed through) through the
sandbox's importer. This times the runner's ``create_instance`` alone, outside any worker, so a
change to what the sandbox re-executes can be measured without an end-to-end bench's noise::

    python -m bench.sandbox_instances                 # every workflow, both runners
    python -m bench.sandbox_instances --profile user  # cProfile of the sandboxed user workflow

Each figure is the fastest of ``--rounds`` rounds of CPU time (``time.process_time``) per
instance, ``--instances`` instances per round, after one warm-up instance per runner: on a box
other work shares, the fastest round is the one least slowed by it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Sequence

import temporalio.converter
import temporalio.workflow
from temporalio.api.common.v1 import Payloads
from temporalio.api.failure.v1 import Failure
from temporalio.worker import UnsandboxedWorkflowRunner, WorkflowInstanceDetails, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox._runner import _fake_info

from workflows.backfill import BackfillWorkflow
from workflows.followed_user import FollowedUserWorkflow
from workflows.reconcile import ReconcileWorkflow
from workflows.user_sync import UserSyncWorkflow

__all__ = ["WORKFLOWS", "instance_cost", "instance_details", "main"]

WORKFLOWS: dict[str, type] = {
    "user": UserSyncWorkflow,
    "followed": FollowedUserWorkflow,
    "reconcile": ReconcileWorkflow,
    "backfill": BackfillWorkflow,
}


def instance_details(cls: type) -> WorkflowInstanceDetails:
    """What a runner needs to create an instance of ``cls`` outside a worker.

    The same details the SDK's own ``prepare_workflow`` validates a definition with.

    Args:
        cls: A ``@workflow.defn`` class.
    """
    return WorkflowInstanceDetails(
        payload_converter_factory=temporalio.converter.DataConverter.default._new_payload_converter,
        failure_converter_class=temporalio.converter.DataConverter.default.failure_converter_class,
        interceptor_classes=[],
        defn=temporalio.workflow._Definition.must_from_class(cls),
        info=_fake_info,
        randomness_seed=-1,
        extern_functions={},
        disable_eager_activity_execution=False,
        worker_level_failure_exception_types=[],
        patch_activation_callback=None,
        last_completion_result=Payloads(),
        last_failure=Failure(),
    )


def instance_cost(runner: WorkflowRunner, cls: type, instances: int, rounds: int) -> float:
    """CPU milliseconds per ``create_instance`` of ``cls`` on ``runner``, fastest round.

    Args:
        runner: The workflow runner (sandboxed or not).
        cls: A ``@workflow.defn`` class.
        instances: Instances created per round.
        rounds: Rounds; the fastest is reported.

    Returns:
        CPU milliseconds per instance.
    """
    details = instance_details(cls)
    runner.create_instance(details)  # warm-up: host-side imports, caches
    per_round = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(instances):
            runner.create_instance(details)
        per_round.append((time.process_time() - start) * 1000 / instances)
    return min(per_round)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the per-instance cost of every workflow on both runners, or profile one.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` if omitted.
    """
    asyncio.run(_main(argv))


async def _main(argv: Sequence[str] | None) -> None:
    # An instance binds itself to the running event loop, as the worker creates it on its loop.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", choices=sorted(WORKFLOWS), help="cProfile one, sandboxed")
    parser.add_argument("--sort", default="cumulative", help="pstats sort key of --profile")
    args = parser.parse_args(argv)
    sandboxed = SandboxedWorkflowRunner()
    if args.profile:
        cls = WORKFLOWS[args.profile]
        details = instance_details(cls)
        sandboxed.create_instance(details)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.instances):
            sandboxed.create_instance(details)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats(args.sort).print_stats(45)
        return
    unsandboxed = UnsandboxedWorkflowRunner()
    print("workflow   sandboxed ms  unsandboxed ms  (CPU per new instance)")
    for name, cls in WORKFLOWS.items():
        with_sandbox = instance_cost(sandboxed, cls, args.instances, args.rounds)
        without = instance_cost(unsandboxed, cls, args.instances, args.rounds)
        print(f"{name:<10} {with_sandbox:>12.2f}  {without:>14.3f}")


if __name__ == "__main__":
    main()
