"""The worker process: hosts the saga's workflows and activities."""

from workers.worker import WorkerResources, build_worker, run_worker

__all__ = ["WorkerResources", "build_worker", "run_worker"]
