"""The bench measures the workflow code as deployed: compiled, not compiled per instance."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import workflows.user_sync as user_sync
from bench.run import compile_workflow_code


def test_stale_bytecode_is_rewritten(tmp_path: Path) -> None:
    module = tmp_path / "user_sync.py"
    module.write_text("VALUE = 1\n")
    cached = Path(importlib.util.cache_from_source(str(module)))

    assert compile_workflow_code(tmp_path)
    first = cached.read_bytes()

    # An edit after setup: newer source, the old bytecode left behind.
    module.write_text("VALUE = 2\n")
    later = cached.stat().st_mtime + 10
    os.utime(module, (later, later))

    assert compile_workflow_code(tmp_path)
    assert cached.read_bytes() != first


def test_the_default_is_this_checkouts_workflow_package() -> None:
    assert compile_workflow_code()
    assert Path(importlib.util.cache_from_source(user_sync.__file__)).exists()
