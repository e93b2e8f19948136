"""The search controller, in layers: ``pipeline`` (what a trial does to a model) and ``storage``
(the SQL tables), ``examples`` (models by spec), ``study`` (the Optuna search), ``hub`` (the HTTP
service), ``cli``. Each imports only the layers before it (``tests/test_architecture.py``).

Heavy modules (torch, optuna) are imported by the modules that need them, never here, so that
``hwprune agent`` and ``hwprune profiles`` start without them.
"""

from __future__ import annotations

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
