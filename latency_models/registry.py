"""Latency backends by name. Built-ins register on import; third parties by entry point."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

from latency_models.base import LatencyBackend
from latency_models.errors import RegistryError, UnknownBackendError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hwprune.latency_backends"

B = TypeVar("B", bound=type[LatencyBackend])
_BACKENDS: dict[str, type[LatencyBackend]] = {}
_entry_points_loaded = False


def register(name: str) -> Callable[[B], B]:
    """Class decorator adding a backend under ``name``; a second use of a name is an error."""

    def add(cls: B) -> B:
        if name in _BACKENDS:
            raise RegistryError(
                f"latency backend {name!r} registered twice: "
                f"{_BACKENDS[name].__module__} and {cls.__module__}"
            )
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return add


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        # Loading the module runs its @register; a broken plugin must not hide the built-ins.
        try:
            point.load()
        except Exception:
            logger.exception("could not load latency backend plugin %s", point.value)


def get(name: str) -> type[LatencyBackend]:
    """The backend class registered as ``name``.

    Raises:
        UnknownBackendError: no such backend; the message lists the known ones.
    """
    _load_entry_points()
    try:
        return _BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(_BACKENDS))
        raise UnknownBackendError(f"no latency backend {name!r}; known: {known}") from None


def names() -> list[str]:
    """Every registered backend name, sorted."""
    _load_entry_points()
    return sorted(_BACKENDS)
