"""The search controller: configuration, pruning space, trials, storage, CLI and hub.

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
