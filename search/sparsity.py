"""N:M semi-structured sparsity: in every run of M consecutive input weights keep the N largest.

The runs lie along the input (reduction) dimension, the layout NVIDIA's sparse tensor cores
accelerate: for a Linear ``[out, in]`` along ``in``; for a Conv2d ``[out, in, kh, kw]`` along
``in`` at each kernel position.
"""

from __future__ import annotations

import torch
from torch import nn

from search.errors import PlanError

Prunable = nn.Conv2d | nn.Linear


def input_size(layer: nn.Module) -> int:
    """The length of the dimension N:M runs lie along."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels // layer.groups
    raise PlanError(f"N:M sparsity needs a Conv2d or Linear, got {type(layer).__name__}")


def is_eligible(layer: nn.Module, m: int) -> bool:
    """Dense Conv2d (not grouped/depthwise) or Linear whose input size divides by ``m``."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return False
    if not isinstance(layer, nn.Conv2d | nn.Linear):
        return False
    return input_size(layer) % m == 0


def _runs_view(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The weight rearranged as ``[..., M]`` runs along the input dimension."""
    if weight.dim() == 2:
        out_features, in_features = weight.shape
        return weight.reshape(out_features, in_features // m, m)
    out_channels, in_channels, kh, kw = weight.shape
    # [O, I, kh, kw] -> [O, kh, kw, I] so that the last axis is the input channel.
    return weight.permute(0, 2, 3, 1).reshape(out_channels, kh, kw, in_channels // m, m)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude weights of every run of ``m``.

    Ties are broken by position (a stable sort), so the mask is deterministic.
    """
    runs = _runs_view(weight.detach().abs(), m)
    order = torch.sort(runs, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(runs, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    if weight.dim() == 2:
        return keep.reshape(weight.shape)
    out_channels, in_channels, kh, kw = weight.shape
    return keep.reshape(out_channels, kh, kw, in_channels).permute(0, 3, 1, 2).contiguous()


def apply_nm(layer: nn.Module, n: int, m: int) -> torch.Tensor:
    """Zero the weights outside the N:M mask, in place and permanently; returns the mask."""
    if not is_eligible(layer, m):
        raise PlanError(
            f"{type(layer).__name__} with input size {input_size(layer)} cannot take {n}:{m} "
            f"sparsity: it needs a dense Conv2d or Linear with input size divisible by {m}"
        )
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        raise PlanError(f"{type(layer).__name__} has no weight tensor to sparsify")
    mask = nm_mask(weight, n, m)
    with torch.no_grad():
        weight.mul_(mask)
    return mask


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every run of ``m`` input weights has at most ``n`` non-zeros."""
    runs = _runs_view(weight.detach(), m)
    return bool(((runs != 0).sum(dim=-1) <= n).all())
