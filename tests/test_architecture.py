"""The folders are the architecture: imports point one way, down the layers below, with no cycles.

Layers, lowest first (a module may import its own unit and any unit of a lower layer, lazily or
not; never a unit of its own layer or above):

    hardware_profiles < latency_models < search.errors < search.config
      < search.pipeline = search.storage < search.examples < search.study < search.hub < search.api
      < search.cli

The package ``search`` re-exports ``search.api`` lazily through ``__getattr__`` (PEP 562) with
``importlib``, which this check does not see: ``search.load`` works without loading torch at import.

``search.pipeline`` (what a trial does to a model) and ``search.storage`` (the SQL tables) share a
layer and know nothing of each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "latency_models", "hardware_profiles")
LAYERS: dict[str, float] = {
    "hardware_profiles": 0,
    "latency_models": 1,
    "search.errors": 2,
    "search": 2.5,  # the package's __init__ re-exports the errors only
    "search.config": 3,
    "search.progress": 3,  # reporting hooks only: imports nothing of the project
    "search.pipeline": 4,
    "search.storage": 4,
    "search.examples": 5,
    "search.study": 6,
    "search.hub": 7,
    "search.api": 7.5,  # the Python API; the CLI is a layer over it
    "search.cli": 8,
    "search.__main__": 9,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every import of a project module by a project module, at module level or inside functions."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _unit(module: str) -> str:
    """The longest layer name that ``module`` is, or is inside of."""
    return max((unit for unit in LAYERS if module == unit or module.startswith(unit + ".")), key=len)


def test_every_module_has_a_layer() -> None:
    # A new sub-package must be placed in the layering, not slip past it.
    for module in _modules():
        assert _unit(module) in LAYERS


def _upward_imports(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        unit = _unit(module)
        for target in targets:
            other = _unit(target)
            if other != unit and LAYERS[other] >= LAYERS[unit]:
                wrong.append(f"{module} imports {target} ({unit} may not import {other})")
    return sorted(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def test_imports_point_down_the_layers() -> None:
    wrong = _upward_imports(_imports(_modules()))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    assert _cycles(_imports(_modules())) == []


def test_the_checks_catch_what_they_look_for() -> None:
    # An upward import (pipeline -> study), a same-layer one (pipeline -> storage) and a cycle.
    edges = {
        "search.pipeline.space": {"search.study.controller", "search.storage.models"},
        "search.study.controller": {"search.pipeline.space"},
        "search.storage.models": set(),
    }
    assert len(_upward_imports(edges)) == 2
    assert _cycles(edges) == [["search.pipeline.space", "search.study.controller"]]


@pytest.mark.parametrize("module", ["search.hub.app", "search.study.read", "search.study.runtime"])
def test_read_side_and_hub_load_no_torch(module: str) -> None:
    code = f"import sys, {module}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", f"importing {module} loaded torch"
