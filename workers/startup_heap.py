"""Keep what a long-running process built at start-up out of its later garbage collections."""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> None:
    """Move every object alive now into the collector's permanent generation.

    Call it once, when start-up is done and before the process serves. Modules, pools and
    clients live as long as the process, yet each full collection walked them all again: in a
    worker about 130,000 objects, a pause of 60-100 ms on this project's 2-core machine, long
    enough to be the p99 of a sync at 10 users/s, and about a quarter of the worker's CPU per
    user (docs/performance.md, "Early morning of 2026-12-05: garbage collection").
    """
    gc.collect()
    gc.freeze()
