"""``--help`` and ``--version`` start at once: nothing heavy is imported to print them."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from chaos.catalogue import SCENARIO_SUMMARIES
from chaos.scenarios import SCENARIOS

CLI = [sys.executable, "-m", "spicesync"]

# Packages that take most of a second to import between them; parsing needs none of them.
HEAVY = {"temporalio", "authzed", "grpc", "asyncpg", "matplotlib", "pydantic", "opentelemetry"}

COMMANDS = [
    [],
    ["stack"],
    ["migrate"],
    ["setup-namespace"],
    ["worker"],
    ["relay"],
    ["relay", "outbox"],
    ["users"],
    ["users", "create"],
    ["users", "update"],
    ["users", "move"],
    ["users", "delete"],
    ["stuck"],
    ["repair"],
    ["codec-server"],
    ["reconcile"],
    ["backfill"],
    ["bench"],
    ["chaos"],
    ["demo"],
]


def imported_modules(args: list[str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "spicesync", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # `-X importtime` writes "import time: self | cumulative | name" to stderr per import.
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    return done, names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "spicesync")
def test_help_imports_nothing_heavy(command: list[str]) -> None:
    done, modules = imported_modules([*command, "--help"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: spicesync" in done.stdout
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"`spicesync {' '.join(command)} --help` imported {heavy[:10]}"


def test_version_is_the_installed_distribution() -> None:
    done, modules = imported_modules(["--version"])
    assert done.returncode == 0
    assert done.stdout.strip() == f"spicesync {importlib.metadata.version('spicesync')}"
    assert not {m for m in modules if m.split(".")[0] in HEAVY}


def test_chaos_help_lists_every_scenario() -> None:
    assert list(SCENARIO_SUMMARIES) == list(SCENARIOS)
    done = subprocess.run(
        [*CLI, "chaos", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert [name for name in listed if name in SCENARIOS] == list(SCENARIOS)
