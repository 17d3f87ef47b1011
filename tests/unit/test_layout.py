"""The layout holds (issue 17): the shared package is the ground floor, and nothing imports in a
cycle. Read from the source with ``ast``, so an import hidden inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABOVE = ("workflows", "activities", "workers", "starters", "bench", "chaos")
FIRST_PARTY = ("spicesync", *ABOVE)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in FIRST_PARTY}


def _sources() -> list[Path]:
    return [p for package in FIRST_PARTY for p in sorted((ROOT / package).rglob("*.py"))]


def test_the_shared_package_imports_nothing_above_it() -> None:
    upward = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "spicesync").rglob("*.py"))
        # The command line is the one package allowed to reach up (its docstring says so).
        if "cli" not in path.relative_to(ROOT / "spicesync").parts
        for name in _imports(path, top_level_only=False)
        if name.split(".")[0] in ABOVE
    }
    assert not upward, sorted(upward)


def test_no_import_cycle_between_modules() -> None:
    modules = {_module(p): p for p in _sources()}

    def resolve(name: str) -> str | None:
        # ``from spicesync.models import X`` names a module; ``from pkg import mod`` may too.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {
        module: {
            target
            for name in _imports(path, top_level_only=False)
            if (target := resolve(name)) is not None and target != module
        }
        for module, path in modules.items()
    }
    # A package's __init__ re-exporting its own modules is not a cycle of the code's design.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(f"{t}.")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, cycles[:5]
