"""Configuration: the one place where flags, environment and files are merged.

Nothing below the CLI and the service reads the environment; they call these helpers and pass the
results on as arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from hardware_profiles import HardwareProfile, load_profile
from latency_models import registry
from search.errors import ConfigError

PROFILES_ENV = "HWPRUNE_PROFILES"
CACHE_ENV = "HWPRUNE_CACHE"


def profile_dirs(
    flag_dirs: Sequence[Path] | None, environ: Mapping[str, str] = os.environ
) -> list[Path]:
    """User profile folders: ``--profiles-dir`` flags win over ``HWPRUNE_PROFILES``.

    ``HWPRUNE_PROFILES`` holds one or more folders separated by the OS path separator.
    """
    if flag_dirs:
        return [Path(d) for d in flag_dirs]
    value = environ.get(PROFILES_ENV, "")
    return [Path(part) for part in value.split(os.pathsep) if part]


def resolve_profile(name: str, dirs: Sequence[Path]) -> HardwareProfile:
    """Load a profile and check that its backend is one hwprune knows.

    Raises:
        ProfileNotFoundError / InvalidProfileError: from the loader.
        ConfigError: the profile names an unknown backend.
    """
    profile = load_profile(name, dirs)
    check_backend(profile)
    return profile


def check_backend(profile: HardwareProfile) -> None:
    """Refuse a profile whose ``backend`` is not in the latency registry."""
    known = registry.names()
    if profile.backend not in known:
        raise ConfigError(
            f"profile {profile.name!r}: backend {profile.backend!r} is unknown; "
            f"known: {', '.join(known)}"
        )


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where trained examples and artifacts are cached: ``HWPRUNE_CACHE``, else the XDG cache."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hwprune"
