"""Imports point one way (search -> latency_models -> hardware_profiles) and __all__ is honest."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["search", "latency_models", "hardware_profiles"]

# What each package may not load when imported on its own.
FORBIDDEN = {
    "hardware_profiles": ["search", "latency_models", "torch", "optuna"],
    "latency_models": ["search", "torch", "optuna", "torch_pruning"],
    "search": ["torch", "optuna", "torch_pruning"],
}


@pytest.mark.parametrize("package", PACKAGES)
def test_import_loads_nothing_upstream(package: str) -> None:
    code = (
        f"import sys, {package}\n"
        f"bad = [m for m in {FORBIDDEN[package]!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {package} loaded {out.stdout.strip()}"


@pytest.mark.parametrize("package", PACKAGES)
def test_all_lists_exactly_the_public_names(package: str) -> None:
    module = importlib.import_module(package)
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not getattr(value, "__name__", "").startswith(f"{package}.")
        and getattr(value, "__module__", package).startswith(package)
    }
    exported = set(module.__all__)
    assert len(module.__all__) == len(exported), "duplicates in __all__"
    assert exported <= set(vars(module)), f"__all__ names missing attributes: {exported - set(vars(module))}"
    assert public <= exported, f"public names not in __all__: {public - exported}"
