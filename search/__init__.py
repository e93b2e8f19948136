"""The search controller, in layers: ``pipeline`` (what a trial does to a model) and ``storage``
(the SQL tables), ``examples`` (models by spec), ``study`` (the Optuna search), ``hub`` (the HTTP
service), ``cli``. Each imports only the layers before it (``tests/test_architecture.py``).

Heavy modules (torch, optuna) are imported by the modules that need them, never here, so that
``hwprune agent`` and ``hwprune profiles`` start without them. The Python API is ``search.api``;
its functions are also reachable here, loaded on first use: ``search.load(folder)``.
"""

from __future__ import annotations

from typing import Any

from search.errors import (
    ConfigError,
    ExportError,
    ModelLoadError,
    PlanError,
    PruningError,
    SearchError,
)

__all__ = [
    "ConfigError",
    "ExportError",
    "ModelLoadError",
    "PlanError",
    "PruningError",
    "SearchError",
]


def __getattr__(name: str) -> Any:
    # PEP 562: `search.load(...)` and the other API functions without importing torch at
    # `import search` (the agent imports this package on devices without torch).
    import importlib

    api = importlib.import_module("search.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
