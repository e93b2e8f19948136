"""Multiply-accumulates of a model as it runs on one example.

Counted from what actually runs, not from module types: a forward hook on every ``nn.Conv2d`` and
``nn.Linear`` *including subclasses* (EfficientNet's ``Conv2dStaticSamePadding`` pads and calls
``F.conv2d`` in its own ``forward``; torch-pruning's ``count_ops_and_params`` matches module types
exactly and missed 95% of that model), each ``nn.MultiheadAttention`` (its packed in-projection is
no ``Linear``), and the matrix products of attention written as tensor operations (``q @ k.T``,
``torch.matmul``, ``scaled_dot_product_attention``), seen through a ``TorchFunctionMode``.
Element-wise work (BatchNorm, activations, pooling) is not counted: MACs here are what the
latency models and the MAC shares of ``hwprune space`` are about.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from search.pipeline.inputs import ModelInput, run


@dataclass(frozen=True, slots=True)
class MacCount:
    """MACs of one forward pass.

    Attributes:
        total: every MAC counted (layers, attention modules and attention products).
        layers: per Conv2d/Linear layer name, summed over its calls.
        order: the layer names in the order they ran (a layer run twice appears twice).
        attention: per ``nn.MultiheadAttention`` name: its projections and products.
        params: parameters of the model.
    """

    total: int
    layers: Mapping[str, int]
    order: tuple[str, ...]
    attention: Mapping[str, int]
    params: int


def macs_per_output(layer: nn.Module) -> int:
    """Multiply-accumulates per output value of a Conv2d or Linear (0 for anything else)."""
    if isinstance(layer, nn.Linear):
        return int(layer.in_features)
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return int(layer.in_channels // layer.groups) * int(kh) * int(kw)
    return 0


def _product_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    # a [..., n, k] @ b [..., k, m]: n*k*m per broadcast batch element.
    if a.dim() == 1 or b.dim() == 1:
        return int(a.numel()) if b.dim() == 1 else int(b.numel())
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # type: ignore[no-untyped-call]
    return int(torch.Size(batch).numel()) * int(a.shape[-2]) * int(a.shape[-1]) * int(b.shape[-1])


def _attention_macs(args: tuple[Any, ...]) -> int:
    query, key = args[0], args[1]  # [..., L, E] and [..., S, E]; value [..., S, Ev]
    value = args[2]
    rows = int(query.numel()) // int(query.shape[-1])
    return rows * int(key.shape[-2]) * (int(query.shape[-1]) + int(value.shape[-1]))


_PRODUCTS: dict[Callable[..., Any], Callable[[tuple[Any, ...]], int]] = {
    torch.matmul: lambda args: _product_macs(args[0], args[1]),
    torch.Tensor.matmul: lambda args: _product_macs(args[0], args[1]),
    torch.Tensor.__matmul__: lambda args: _product_macs(args[0], args[1]),
    torch.Tensor.__rmatmul__: lambda args: _product_macs(args[1], args[0]),
    torch.bmm: lambda args: _product_macs(args[0], args[1]),
    torch.Tensor.bmm: lambda args: _product_macs(args[0], args[1]),
    nn.functional.scaled_dot_product_attention: _attention_macs,
}


class _Products(TorchFunctionMode):
    """Counts the MACs of matrix products run outside any hooked layer or attention module."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.inside = 0  # >0 while a hooked module runs: its MACs come from its hook

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        counter = _PRODUCTS.get(func)
        if counter is not None and self.inside == 0:
            self.macs += counter(args)
        return func(*args, **(kwargs or {}))


def count_macs(model: nn.Module, example: ModelInput) -> MacCount:
    """Run ``model`` once on ``example`` (no gradients, its mode unchanged) and count its MACs."""
    layers: dict[str, int] = {}
    order: list[str] = []
    attention: dict[str, int] = {}
    products = _Products()
    handles = []

    def enter(_mod: nn.Module, _inp: Any) -> None:
        products.inside += 1

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):

            def hook(mod: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
                products.inside -= 1
                layers[name] = layers.get(name, 0) + int(out.numel()) * macs_per_output(mod)
                order.append(name)

        elif isinstance(module, nn.MultiheadAttention):

            def hook(mod: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
                products.inside -= 1
                attention[name] = attention.get(name, 0) + _mha_macs(mod, _inp, out)

        else:
            continue
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), products:
            run(model, example)
    finally:
        for handle in handles:
            handle.remove()
    total = sum(layers.values()) + sum(attention.values()) + products.macs
    params = sum(int(p.numel()) for p in model.parameters())
    return MacCount(total, layers, tuple(order), attention, params)


def _mha_macs(mod: Any, inputs: Any, out: Any) -> int:
    # q, k, v and out projections (E x E each) plus the two products over the key positions.
    embed = int(mod.embed_dim)
    query = inputs[0] if inputs else out[0]
    key = inputs[1] if len(inputs) > 1 else query
    seq_axis = 1 if getattr(mod, "batch_first", False) else 0
    tokens = int(out[0].numel()) // embed
    keys = int(key.numel()) // embed
    per_query_keys = int(key.shape[seq_axis]) if key.dim() == 3 else keys
    return 2 * tokens * embed**2 + 2 * keys * embed**2 + 2 * tokens * per_query_keys * embed
