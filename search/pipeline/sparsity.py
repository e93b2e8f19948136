"""N:M semi-structured sparsity: in every run of M consecutive input weights keep N.

Which N are kept is the criterion's choice: magnitude, Wanda or SparseGPT (see ``sparsify``).

The runs lie along the input (reduction) dimension, the layout NVIDIA's sparse tensor cores
accelerate: for a Linear ``[out, in]`` along ``in``; for a Conv2d ``[out, in, kh, kw]`` along
``in`` at each kernel position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from search.errors import PlanError, PruningError
from search.pipeline.inputs import ModelInput, concatenated, run, shapes

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
    """Boolean mask keeping the ``n`` largest-magnitude entries of every run of ``m``.

    ``weight`` may be a score of the weight's shape (Wanda's metric) instead of the weight.

    Ties are broken by position, as a stable descending sort would, so the mask is deterministic.
    """
    runs = _runs_view(weight.detach().abs(), m)
    # An entry's place in that sort is how many in its run are larger, or equal and earlier:
    # m comparisons of the whole tensor, about twice as fast as sorting runs of m.
    place = torch.zeros(runs.shape, dtype=torch.int16, device=runs.device)
    for j in range(m):
        other = runs[..., j : j + 1]
        ahead = other > runs
        ahead[..., j + 1 :] |= other == runs[..., j + 1 :]
        place += ahead
    keep = place < n
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


# --- criteria: which weights of each run are kept ----------------------------------------------

NM_CRITERIA: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
SPARSEGPT_DAMPING = 0.01  # of the Hessian's mean diagonal, as in SparseGPT and llmcompressor
SPARSEGPT_BLOCK = 128  # columns per lazy batch of updates (SparseGPT's default)


def _columns(layer: Prunable, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``[rows, columns]`` in the column order of ``_weight_matrix``."""
    if isinstance(layer, nn.Linear):
        return inputs.reshape(-1, layer.in_features)
    patches = nn.functional.unfold(inputs, layer.kernel_size, dilation=layer.dilation,  # type: ignore[arg-type]
                                   padding=layer.padding, stride=layer.stride)  # type: ignore[arg-type]
    batch, _, places = patches.shape
    kh, kw = layer.kernel_size
    # unfold orders columns (in, kh, kw); N:M runs need (kh, kw, in): M adjacent input channels.
    patches = patches.reshape(batch, layer.in_channels, kh * kw, places).permute(0, 2, 1, 3)
    return patches.reshape(batch, kh * kw * layer.in_channels, places).transpose(1, 2).reshape(
        -1, kh * kw * layer.in_channels)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight as ``[out, columns]`` with N:M runs on consecutive columns."""
    if weight.dim() == 2:
        return weight
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _from_matrix(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 2:
        return matrix.reshape(like.shape)
    out_channels, in_channels, kh, kw = like.shape
    return matrix.reshape(out_channels, kh, kw, in_channels).permute(0, 3, 1, 2).contiguous()


STATISTICS_CHUNK = 64  # samples per step when accumulating X^T X: bounds the unfolded copy's memory


def _input_statistics(layer: Prunable, inputs: torch.Tensor, *, hessian: bool) -> tuple[torch.Tensor, int]:
    """``X^T X`` (``hessian``) or the squared column norms of X, over all calibration samples."""
    total: torch.Tensor | None = None
    rows = 0
    for chunk in torch.split(inputs, STATISTICS_CHUNK):
        columns = _columns(layer, chunk).double()
        part = columns.T @ columns if hessian else columns.square().sum(dim=0)
        total = part if total is None else total + part
        rows += columns.shape[0]
    if total is None:
        raise PlanError("N:M calibration got no samples; the training loader yielded none")
    return total, rows


def _wanda(layer: Prunable, column_sq_norms: torch.Tensor, n: int, m: int) -> torch.Tensor:
    # Wanda's metric |W_ij| * ||X_j||; N:M runs lie within one output row, so the comparison is
    # per output row as the paper prescribes.
    score = _weight_matrix(layer.weight.detach()).double().abs() * column_sq_norms.sqrt()
    return nm_mask(_from_matrix(score, layer.weight), n, m)


def _sparsegpt(layer: Prunable, hessian: torch.Tensor, rows: int, n: int, m: int) -> torch.Tensor:
    """SparseGPT's one-shot N:M pruning: masks by OBS saliency, and the kept weights updated.

    Follows ``SparseGPT.fasterprune`` (Frantar & Alistarh, 2023) with ``prunen=n, prunem=m``.
    """
    weight = _weight_matrix(layer.weight.detach()).double().clone()
    columns = weight.shape[1]
    h = hessian * (2.0 / rows)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h += torch.eye(columns, dtype=h.dtype) * SPARSEGPT_DAMPING * torch.mean(torch.diag(h))
    try:
        h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:  # torch.linalg.LinAlgError is a RuntimeError
        raise PruningError(f"SparseGPT: the calibration Hessian of a layer is not positive definite: {exc}") from exc
    keep = torch.ones_like(weight, dtype=torch.bool)
    for start in range(0, columns, SPARSEGPT_BLOCK):
        end = min(start + SPARSEGPT_BLOCK, columns)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_inv = h_inv[start:end, start:end]
        for i in range(end - start):
            if i % m == 0:
                saliency = block[:, i:i + m].square() / torch.diag(block_inv)[i:i + m].square()
                order = torch.sort(saliency, dim=1, stable=True).indices
                keep[:, start + i:start + i + m].scatter_(1, order[:, : m - n], False)
            column = block[:, i]
            diagonal = block_inv[i, i]
            quantised = column * keep[:, start + i]
            error = (column - quantised) / diagonal
            block[:, i:] -= error.unsqueeze(1) @ block_inv[i, i:].unsqueeze(0)
            block[:, i] = quantised
            errors[:, i] = error
        weight[:, start:end] = block
        weight[:, end:] -= errors @ h_inv[start:end, end:]
    with torch.no_grad():
        layer.weight.copy_(_from_matrix(weight * keep, layer.weight).to(layer.weight.dtype))
    return _from_matrix(keep, layer.weight)


def sparsify(
    model: nn.Module,
    patterns: Mapping[str, tuple[int, int]],
    *,
    criterion: str = "magnitude",
    calibration: Sequence[ModelInput] = (),
) -> dict[str, torch.Tensor]:
    """Give each layer of ``patterns`` its N:M pattern, in place; returns the masks by layer name.

    ``magnitude`` keeps the largest weights of each run. ``wanda`` keeps the largest
    ``|W| * ||X||`` (Sun et al., 2023). ``sparsegpt`` chooses by OBS saliency and updates the kept
    weights to reconstruct the layer's output (Frantar & Alistarh, 2023). The two last read each
    layer's input on the ``calibration`` batches in one forward pass of them all: a hook prunes
    each layer just before it runs, so every layer sees inputs from already-sparse earlier layers,
    as both papers' sequential code does; Wanda on a model with BatchNorm reads the dense model's
    inputs instead (stale BatchNorm statistics distort the sequential ones). Deterministic for a
    fixed thread count (statistics are accumulated in float64).

    Raises:
        PlanError: an unknown criterion, a data-aware criterion without calibration batches, a
            layer that cannot take its pattern or that the calibration forward never reached.
    """
    if criterion not in NM_CRITERIA:
        raise PlanError(f"N:M criterion {criterion!r} is unknown; choose one of: {', '.join(NM_CRITERIA)}")
    if not patterns:
        return {}  # an all-dense plan: nothing to mask, and no calibration batches were drawn for it
    if criterion != "magnitude" and not calibration:
        raise PlanError(f"N:M criterion {criterion!r} needs calibration batches (the bundle's training loader)")
    layers = _eligible_layers(model, patterns)
    if criterion == "magnitude":
        return {name: apply_nm(layer, *patterns[name]) for name, layer in layers.items()}
    return _calibrated_masks(model, layers, patterns, criterion, calibration)


def _eligible_layers(model: nn.Module, patterns: Mapping[str, tuple[int, int]]) -> dict[str, Prunable]:
    modules = dict(model.named_modules())
    layers: dict[str, Prunable] = {}
    for name, (n, m) in patterns.items():
        layer = modules[name]
        if not is_eligible(layer, m) or not isinstance(layer, Prunable):
            raise PlanError(
                f"{type(layer).__name__} {name!r} cannot take {n}:{m} sparsity: it needs a dense "
                f"Conv2d or Linear with input size divisible by {m}"
            )
        layers[name] = layer
    return layers


def _calibrated_masks(model: nn.Module, layers: Mapping[str, Prunable], patterns: Mapping[str, tuple[int, int]],
                      criterion: str, calibration: Sequence[ModelInput]) -> dict[str, torch.Tensor]:
    """Wanda's or SparseGPT's masks, each layer pruned by a hook just before it runs."""
    masks: dict[str, torch.Tensor] = {}
    # Wanda on a model with BatchNorm reads the dense model's inputs: layer by layer, earlier
    # sparse layers feed later ones through stale BatchNorm statistics, which adaptive BN replaces
    # after pruning anyway; on the digits CNN those distorted norms chose masks with 0.70 error
    # against 0.29 from the dense inputs (0.033 against 0.006 after adaptive BN; docs/benchmarks.md).
    dense_inputs = criterion == "wanda" and any(isinstance(x, nn.modules.batchnorm._BatchNorm)
                                                for x in model.modules())
    dense_statistics: dict[str, torch.Tensor] = {}

    def prune_before_running(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        layer, (n, m) = layers[name], patterns[name]

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if name in masks or name in dense_statistics:
                return  # a layer called twice in one forward is pruned once
            statistics, rows = _input_statistics(layer, args[0].detach(), hessian=criterion == "sparsegpt")
            if dense_inputs:
                dense_statistics[name] = statistics
            elif criterion == "wanda":
                mask = _wanda(layer, statistics, n, m)
                layer.weight.mul_(mask)
                masks[name] = mask
            else:
                masks[name] = _sparsegpt(layer, statistics, rows, n, m)

        return hook

    try:
        samples = concatenated(list(calibration))
    except RuntimeError as exc:
        found = sorted({tuple(shape[1:] for shape in shapes(batch)) for batch in calibration})
        raise PlanError(f"N:M calibration batches must share one sample shape, got {found}: "
                        "give the training loader fixed-size samples") from exc
    handles = [layer.register_forward_pre_hook(prune_before_running(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            run(model, samples)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for name, statistics in dense_statistics.items():
            masks[name] = _wanda(layers[name], statistics, *patterns[name])
            layers[name].weight.mul_(masks[name])
    missing = [name for name in layers if name not in masks]
    if missing:
        raise PlanError(f"the calibration forward never reached {', '.join(missing)}; N:M needs layers that run")
    return masks
