"""The layers of docs/architecture.md, enforced: every import points down (or sideways within a layer)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a module may import its own layer and the ones before it, never one after it.
LAYERS = ["models", "adapters", "service", "tasks", "flows", "entrypoints"]


def imports_of(path: Path) -> set[str]:
    """The top-level packages of this repository that `path` imports (at any depth in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


MODULES = sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_points_down(path: Path) -> None:
    layer = LAYERS.index(path.relative_to(ROOT).parts[0])
    above = {name for name in imports_of(path) if LAYERS.index(name) > layer}
    assert not above, f"{path.relative_to(ROOT)} ({LAYERS[layer]}) imports from a layer above it: {sorted(above)}"


def test_the_pure_domain_imports_no_prefect_no_database_no_clock() -> None:
    pure = ["policy.py", "states.py", "money.py", "rma.py", "notices.py"]
    for name in pure:
        path = ROOT / "models" / name
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in modules if m.split(".")[0] in {"prefect", "sqlalchemy", "sqlmodel", "adapters"}}, name
        assert "datetime.now" not in path.read_text(encoding="utf-8") and "utcnow" not in path.read_text("utf-8"), name


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__init__"))
def test_every_benchmark_module_imports(name: str) -> None:
    """The benchmarks run outside the suite: a name moved from under them fails here, not at the next bench run."""
    import importlib

    importlib.import_module(f"bench.{name}")
