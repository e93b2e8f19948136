"""Architecture features of a (pruned) model for latency models: the shape, MACs and bytes moved of
every Conv2d/Linear layer as it runs, and its N:M pattern. Plain data (``latency_models.predictors``),
so a latency model never needs torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from latency_models.predictors import ArchitectureFeatures, LayerFeatures
from latency_models.predictors.features import BYTES_PER_VALUE
from search.pipeline.inputs import run
from search.pipeline.macs import macs_per_output

__all__ = ["architecture_features", "macs_per_output"]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, tuple | list):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def architecture_features(model: nn.Module, example: Any, patterns: Mapping[str, str] | None = None
                          ) -> ArchitectureFeatures:
    """Run ``model`` once on ``example`` and describe every Conv2d/Linear layer, in run order.

    ``patterns``: the N:M pattern per layer name (others are dense). A layer that runs twice is
    described once, with its MACs summed.
    """
    patterns = patterns or {}
    found: dict[str, LayerFeatures] = {}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue

        def hook(mod: nn.Module, inputs: Any, output: torch.Tensor, name: str = name) -> None:
            x = inputs[0]
            weights = sum(int(p.numel()) for p in mod.parameters(recurse=False))
            if isinstance(mod, nn.Conv2d):
                in_hw, out_hw = _pair(tuple(x.shape[-2:])), _pair(tuple(output.shape[-2:]))
                macs = int(output[0].numel()) * macs_per_output(mod)
                layer = LayerFeatures(
                    name=name, kind="conv", in_channels=mod.in_channels, out_channels=mod.out_channels,
                    groups=mod.groups, kernel=_pair(mod.kernel_size), stride=_pair(mod.stride),
                    padding=_pair(mod.padding if isinstance(mod.padding, tuple) else 0), in_hw=in_hw,
                    out_hw=out_hw, macs=macs,
                    bytes_moved=(int(x[0].numel()) + int(output[0].numel()) + weights) * BYTES_PER_VALUE,
                    nm=patterns.get(name, "dense"))
            else:
                assert isinstance(mod, nn.Linear)
                rows = int(x[0].numel()) // mod.in_features
                layer = LayerFeatures(
                    name=name, kind="linear", in_channels=mod.in_features, out_channels=mod.out_features,
                    groups=1, kernel=(1, 1), stride=(1, 1), padding=(0, 0), in_hw=(rows, 1), out_hw=(rows, 1),
                    macs=rows * mod.in_features * mod.out_features,
                    bytes_moved=(rows * (mod.in_features + mod.out_features) + weights) * BYTES_PER_VALUE,
                    nm=patterns.get(name, "dense"))
            seen = found.get(name)
            if seen is not None:
                layer = LayerFeatures(**{**seen.to_dict(), "macs": seen.macs + layer.macs,
                                         "bytes_moved": seen.bytes_moved + layer.bytes_moved,
                                         "kernel": seen.kernel, "stride": seen.stride, "padding": seen.padding,
                                         "in_hw": seen.in_hw, "out_hw": seen.out_hw})
            found[name] = layer

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run(model, example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return ArchitectureFeatures(tuple(found.values()))
