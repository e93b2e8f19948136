"""The console-script entry point: every command group registers itself on the application."""

from __future__ import annotations

import importlib
import sys

from search.cli._app import app

# Each module adds its commands to ``app`` when imported; this order is the order of `hwprune --help`.
COMMAND_MODULES = ("profiles", "model", "agents", "doctor", "searches", "latency_model")
for _module in COMMAND_MODULES:
    importlib.import_module(f"search.cli.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())  # typer handles its own usage errors with status 2
