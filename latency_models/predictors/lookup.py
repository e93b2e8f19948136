"""The per-layer lookup table (NetAdapt): every prunable layer timed alone, as a one-node ONNX
graph on the target, at each kept-channel option with its input width; a plan's latency is the
sum of its layers' entries, and a linear correction fitted on whole-model measurements maps that
sum's ratio to the base model's onto the measured ratio (the rest of the graph: activations,
pooling, additions, memory traffic between layers, fusions).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from latency_models.base import LatencyBackend
from latency_models.predictors.contract import LatencyModel, LatencyModelError, Sample, register_kind
from latency_models.predictors.features import BYTES_PER_VALUE, ArchitectureFeatures, LayerFeatures

OPSET = 17


def entry_key(layer: LayerFeatures) -> str:
    return f"{layer.name}|{layer.in_channels}|{layer.out_channels}|{layer.nm}"


def resized(layer: LayerFeatures, in_channels: int, out_channels: int) -> LayerFeatures:
    """``layer`` with other channel counts (a depthwise conv keeps in = out = groups)."""
    depthwise = layer.kind == "conv" and layer.groups > 1 and layer.groups == layer.in_channels
    if depthwise:
        in_channels = out_channels = min(in_channels, out_channels)
    groups = in_channels if depthwise else layer.groups
    kh, kw = layer.kernel
    if layer.kind == "conv":
        macs = out_channels * layer.out_hw[0] * layer.out_hw[1] * (in_channels // groups) * kh * kw
        weights = out_channels * (in_channels // groups) * kh * kw
        values = in_channels * layer.in_hw[0] * layer.in_hw[1] + out_channels * layer.out_hw[0] * layer.out_hw[1]
    else:
        rows = layer.in_hw[0]
        macs = rows * in_channels * out_channels
        weights = in_channels * out_channels
        values = rows * (in_channels + out_channels)
    return replace(layer, in_channels=in_channels, out_channels=out_channels, groups=groups, macs=macs,
                   bytes_moved=(values + weights + out_channels) * BYTES_PER_VALUE)


def layer_graph(layer: LayerFeatures) -> Any:
    """A one-layer ONNX model (batch dimension symbolic) with seeded random weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if layer.kind == "conv":
        kh, kw = layer.kernel
        weight = rng.standard_normal((layer.out_channels, layer.in_channels // layer.groups, kh, kw)).astype("float32")
        shape: list[int | str] = ["batch", layer.in_channels, *layer.in_hw]
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=layer.groups, kernel_shape=[kh, kw],
                                strides=list(layer.stride), pads=[*layer.padding, *layer.padding])
        nodes = [node]
        out_shape: list[int | str] = ["batch", layer.out_channels, *layer.out_hw]
    else:
        weight = rng.standard_normal((layer.in_channels, layer.out_channels)).astype("float32")
        rows = layer.in_hw[0]
        shape = ["batch", layer.in_channels] if rows <= 1 else ["batch", rows, layer.in_channels]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
        out_shape = [*shape[:-1], layer.out_channels]
    bias = rng.standard_normal((layer.out_channels,)).astype("float32")
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def variants(base: ArchitectureFeatures,
             options: Mapping[str, tuple[Sequence[int], Sequence[int]]]) -> list[LayerFeatures]:
    """Every (input width, output width) combination of each layer named in ``options``; layers
    not named appear at their base widths only."""
    found: dict[str, LayerFeatures] = {}
    for layer in base.layers:
        ins, outs = options.get(layer.name, ((layer.in_channels,), (layer.out_channels,)))
        for width_in in ins:
            for width_out in outs:
                variant = resized(layer, width_in, width_out)
                found.setdefault(entry_key(variant), variant)
    return list(found.values())


def time_layers(backend: LatencyBackend, layers: Iterable[LayerFeatures],
                progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Median microseconds of each layer alone on ``backend`` (an open backend), by entry key."""
    import onnx

    table: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.onnx"
        for index, layer in enumerate(layers):
            onnx.save(layer_graph(layer), str(path))
            table[entry_key(layer)] = backend.measure(path).median_us
            if progress is not None:
                progress(index + 1)
    return table


@register_kind
class LookupTableModel(LatencyModel):
    """Sum of per-layer table entries, as a ratio to the base model's sum, linearly corrected."""

    kind = "lookup-table"

    def __init__(self, base: ArchitectureFeatures, table: Mapping[str, float] | None = None) -> None:
        super().__init__(base)
        self.table = dict(table or {})
        self.slope, self.intercept = 1.0, 0.0
        self._by_layer: dict[str, list[tuple[LayerFeatures, float]]] = {}

    def _fresh(self) -> LatencyModel:
        return LookupTableModel(self.base, self.table)

    def _entry_us(self, layer: LayerFeatures) -> float:
        hit = self.table.get(entry_key(layer))
        if hit is not None:
            return hit
        if not self._by_layer:
            known = {layer.name for layer in self.base.layers}
            for key, value in self.table.items():
                name, width_in, width_out, nm = key.rsplit("|", 3)
                if name in known:
                    reference = self.base.by_name()[name]
                    entry = resized(reference, int(width_in), int(width_out))
                    self._by_layer.setdefault(name, []).append((replace(entry, nm=nm), value))
        entries = self._by_layer.get(layer.name)
        if not entries:
            return 0.0  # not a timed layer: the correction carries it
        # The nearest timed shape, scaled by MACs (an N:M layer is timed as its dense shape).
        nearest, value = min(entries, key=lambda e: abs(math.log((e[0].macs + 1) / (layer.macs + 1))))
        return value * (layer.macs + 1) / (nearest.macs + 1)

    def raw_ratio(self, features: ArchitectureFeatures) -> float:
        base_us = sum(self._entry_us(layer) for layer in self.base.layers)
        if base_us <= 0:
            raise LatencyModelError("the lookup table has no entry for any layer of the base model")
        return sum(self._entry_us(layer) for layer in features.layers) / base_us

    def _fit_core(self, samples: Sequence[Sample]) -> None:
        import numpy as np

        raw = np.array([self.raw_ratio(f) for f, _ in samples])
        measured = np.array([r for _, r in samples])
        if len(samples) < 3 or float(np.ptp(raw)) == 0.0:
            self.slope, self.intercept = 1.0, 0.0
            return
        design = np.stack([raw, np.ones_like(raw)], axis=1)
        (slope, intercept), *_ = np.linalg.lstsq(design, measured, rcond=None)
        self.slope, self.intercept = float(slope), float(intercept)

    def _predict_core(self, features: ArchitectureFeatures) -> tuple[float, float]:
        return self.slope * self.raw_ratio(features) + self.intercept, 1.0

    def _params(self) -> dict[str, Any]:
        return {"table": dict(sorted(self.table.items())), "slope": self.slope, "intercept": self.intercept}

    def _load_params(self, params: Mapping[str, Any]) -> None:
        self.table = {str(k): float(v) for k, v in params["table"].items()}
        self.slope, self.intercept = float(params["slope"]), float(params["intercept"])
        self._by_layer = {}
