"""The bench's systems: names, which run by default, and what an on-request variant changes."""

from __future__ import annotations

from typing import Any, cast

import pytest

from bench.context import BenchContext
from bench.run import all_systems, known_systems
from spicesync.settings import Settings


def _by_name() -> dict[str, Any]:
    return {system.name: system for system in known_systems()}


def test_names_are_unique_and_the_default_run_is_unchanged() -> None:
    names = [system.name for system in known_systems()]
    assert len(names) == len(set(names))
    defaults = {system.name for system in all_systems()}
    on_request = set(names) - defaults
    assert on_request == {
        "spicesync (no idle time)",
        "spicesync (no idle time, no sandbox)",
        "spicesync follow (outbox relay, no idle time)",
    }


@pytest.mark.parametrize(
    ("name", "sandboxed"),
    [
        ("spicesync", True),
        ("spicesync (no idle time)", True),
        ("spicesync (no idle time, no sandbox)", False),
    ],
)
def test_only_the_no_sandbox_variant_runs_its_worker_unsandboxed(
    monkeypatch: pytest.MonkeyPatch, name: str, sandboxed: bool
) -> None:
    monkeypatch.delenv("SPICESYNC_WORKFLOW_SANDBOX", raising=False)
    system = _by_name()[name]
    assert system.worker_command()[-2:] == ["spicesync", "worker"]
    process_env = getattr(system, "process_env", None)
    # None of these reads the cell: the variant's environment is the same in every cell.
    extra = process_env(cast(BenchContext, None)) if process_env is not None else {}
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    assert Settings(_env_file=None).workflow_sandbox is sandboxed


def test_the_follow_variant_only_adds_no_idle_time_to_the_outbox_systems_environment() -> None:
    systems = _by_name()
    ctx = cast(BenchContext, None)
    default = systems["spicesync follow (outbox relay)"].process_env(ctx)
    closing = systems["spicesync follow (outbox relay, no idle time)"].process_env(ctx)
    assert closing == default | {"SPICESYNC_FOLLOW_IDLE_SECONDS": "0"}
    assert "SPICESYNC_FOLLOW_IDLE_SECONDS" not in default
