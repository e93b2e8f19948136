"""Plans: one point of a search space, as a mapping from names to decisions.

A plan file (YAML or JSON)::

    channels:            # per prunable group (missing: dense)
      stages.1.0: 0.5    #   a keep-ratio: a decimal in (0, 1], rounded to the nearest option
      stages.2.0: 64     #   or the kept channel count: an integer, one of the group's options
    sparsity:            # N:M pattern per eligible layer (missing: dense)
      stages.2.1.conv1: "2:4"

``hwprune plan template --model SPEC -p PROFILE`` writes one with every group, layer and option.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hardware_profiles.loader import YamlInputError, read_yaml_file, short_repr
from search.errors import PlanError


@dataclass(frozen=True)
class Plan:
    """Keep-ratios (floats) or kept counts (ints) by group name, N:M patterns by layer name.

    ``SearchSpace.resolve`` turns counts into the ratios that keep them.
    """

    channels: Mapping[str, float] = field(default_factory=dict)
    sparsity: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": dict(sorted(self.channels.items())),
            "sparsity": {k: v for k, v in sorted(self.sparsity.items()) if v != "dense"},
        }

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "plan") -> Plan:
        """Parse a plan mapping; shape errors name the offending entry.

        Raises:
            PlanError: not a mapping, unknown top-level keys, or values of the wrong type.
        """
        if not isinstance(data, dict):
            raise PlanError(f"{origin}: expected a mapping with 'channels' and/or 'sparsity'")
        unknown = set(data) - {"channels", "sparsity"}
        if unknown:
            names = sorted(map(str, unknown))
            # At most five names, each cut short: a hostile file cannot flood the terminal.
            shown = ", ".join(short_repr(name) if len(name) > 40 else name for name in names[:5])
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise PlanError(f"{origin}: unknown key(s) {shown}{more}; allowed: channels, sparsity")
        channels = data.get("channels") or {}
        sparsity = data.get("sparsity") or {}
        if not isinstance(channels, dict) or not isinstance(sparsity, dict):
            raise PlanError(f"{origin}: 'channels' and 'sparsity' must be mappings of name to value")
        ratios: dict[str, float] = {}
        for name, value in channels.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PlanError(f"{origin}: channels for {short_repr(name)} must be a kept count (integer) "
                                f"or a keep-ratio (decimal), got {short_repr(value)}")
            ratios[str(name)] = value  # an int stays an int: a count, not a ratio
        patterns: dict[str, str] = {}
        for name, value in sparsity.items():
            if not isinstance(value, str):
                raise PlanError(
                    f"{origin}: sparsity for {short_repr(name)} must be a string like '2:4' or 'dense', "
                    f"got {short_repr(value)}"
                )
            patterns[str(name)] = value
        return cls(channels=ratios, sparsity=patterns)

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Read a plan from a YAML or JSON file."""
        try:
            data = read_yaml_file(path, what="plan")
        except YamlInputError as exc:
            raise PlanError(str(exc)) from None
        return cls.from_dict(data, origin=f"plan {path.name}")

    def dump(self, path: Path) -> None:
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))
