"""Plans: one point of a search space, as a mapping from names to decisions.

A plan file (YAML or JSON)::

    channels:            # keep-ratio per prunable group (missing: 1.0, dense)
      stages.1.0: 0.5
    sparsity:            # N:M pattern per eligible layer (missing: dense)
      stages.2.1.conv1: "2:4"
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
    """Keep-ratios by group name and N:M patterns by layer name."""

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
                raise PlanError(f"{origin}: ratio for {short_repr(name)} must be a number, got {short_repr(value)}")
            ratios[str(name)] = float(value)
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
