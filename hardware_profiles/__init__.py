"""Hardware profiles: the YAML description of each latency target, its schema and loader."""

from __future__ import annotations

from hardware_profiles.errors import InvalidProfileError, ProfileError, ProfileNotFoundError
from hardware_profiles.loader import (
    BUILTIN_DIR,
    ProfileSource,
    discover,
    load_profile,
    load_profile_file,
    names,
    parse_profile,
)
from hardware_profiles.schema import (
    HardwareProfile,
    RepeatPolicy,
    TensorRTOptions,
    WarmupPolicy,
    parse_pattern,
)

__all__ = [
    "BUILTIN_DIR",
    "HardwareProfile",
    "InvalidProfileError",
    "ProfileError",
    "ProfileNotFoundError",
    "ProfileSource",
    "RepeatPolicy",
    "TensorRTOptions",
    "WarmupPolicy",
    "discover",
    "load_profile",
    "load_profile_file",
    "names",
    "parse_pattern",
    "parse_profile",
]
