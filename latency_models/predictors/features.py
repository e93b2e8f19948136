"""What a latency model sees of a pruned architecture: plain data, one entry per Conv/Linear layer.

The search side computes these from a pruned model (``search.pipeline.features``); nothing here
knows torch. A layer keeps its base-model name in every plan, so the features of two plans of one
base model line up layer by layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from latency_models.errors import LatencyError

BYTES_PER_VALUE = 4  # fp32 tensors; a profile's precision scales every layer alike


class FeatureError(LatencyError):
    """Features that do not describe an architecture (missing fields, wrong types)."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class LayerFeatures:
    """One Conv2d or Linear layer as it runs in a pruned model.

    ``in_hw``/``out_hw`` are the spatial sizes (for a Linear layer: the rows it multiplies, and 1).
    ``bytes_moved`` counts input, output and weight values once each (fp32). ``nm`` is the N:M
    pattern of its weights or ``dense``.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    macs: int
    bytes_moved: int
    nm: str = "dense"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerFeatures:
        try:
            return cls(
                name=str(data["name"]), kind=str(data["kind"]), in_channels=int(data["in_channels"]),
                out_channels=int(data["out_channels"]), groups=int(data["groups"]),
                kernel=_pair(data["kernel"]), stride=_pair(data["stride"]), padding=_pair(data["padding"]),
                in_hw=_pair(data["in_hw"]), out_hw=_pair(data["out_hw"]), macs=int(data["macs"]),
                bytes_moved=int(data["bytes_moved"]), nm=str(data.get("nm", "dense")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureError(f"layer features {str(data)[:120]!r} are malformed: {exc!r}") from None


def _pair(value: Any) -> tuple[int, int]:
    first, second = value
    return int(first), int(second)


@dataclass(frozen=True, slots=True)
class ArchitectureFeatures:
    """Every Conv/Linear layer of one architecture, in the order they run."""

    layers: tuple[LayerFeatures, ...]

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def bytes_moved(self) -> int:
        return sum(layer.bytes_moved for layer in self.layers)

    def by_name(self) -> dict[str, LayerFeatures]:
        return {layer.name: layer for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: Any) -> ArchitectureFeatures:
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), list):
            raise FeatureError("architecture features must be a mapping with a 'layers' list")
        return cls(tuple(LayerFeatures.from_dict(layer) for layer in data["layers"]))
