"""Structured pruning with torch-pruning: group discovery and plan application.

The only module that imports ``torch_pruning``. Groups come from its dependency graph (layers
coupled by residual additions, concatenations, depthwise convolutions and attention reshapes share
one group); importance comes from its estimators; removal is ``Group.prune``. hwprune decides only
how many channels each group keeps, and picks the least important ones deterministically.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from search.errors import PlanError, PruningError
from search.sparsity import apply_nm, satisfies_nm

logger = logging.getLogger(__name__)

Importance = Literal["magnitude", "taylor", "lamp", "bn-scale"]
IMPORTANCES: tuple[str, ...] = ("magnitude", "taylor", "lamp", "bn-scale")
_PRUNABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """A Conv2d or Linear layer of the base model."""

    name: str
    kind: Literal["conv", "linear"]
    in_size: int
    out_size: int
    groups: int
    macs: int


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One torch-pruning dependency group, named by its root module.

    ``kind`` is ``channels`` for ordinary groups and ``heads`` for the output of an attention
    ``qkv`` projection, where whole heads (``unit_width`` channels each, in q, k and v) go at once.
    ``consumers`` are the layers whose input channels are this group's.
    """

    name: str
    kind: Literal["channels", "heads"]
    size: int
    unit_width: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    mac_share: float
    attention: str | None = None


@dataclass(frozen=True, slots=True)
class Discovery:
    groups: tuple[GroupInfo, ...]
    layers: Mapping[str, LayerInfo]
    output_layer: str
    ignored: tuple[str, ...]
    macs: int
    params: int


@dataclass(frozen=True)
class PrunedModel:
    """A pruned copy of the base model and what was done to it.

    Attributes:
        model: the pruned ``nn.Module`` (weights changed in place on a copy).
        kept: kept channels (or heads) per group name.
        sparsity: fraction of zero weights per layer that got an N:M pattern.
        patterns: the N:M pattern per sparse layer.
        masks: the N:M masks, for recovery training to keep zeros at zero.
        macs / params: of the pruned model (dense count: N:M zeros are not subtracted).
        signature: hash of every layer shape plus the sparsity placement; equal signatures run
            the same on any backend, so it keys the latency cache.
        history: torch-pruning's pruning history, replayable on the base model.
        warnings: torch-pruning warnings raised while pruning (they can change the result).
    """

    model: nn.Module
    kept: Mapping[str, int]
    sparsity: Mapping[str, float]
    patterns: Mapping[str, str]
    masks: Mapping[str, torch.Tensor] = field(repr=False)
    macs: int
    params: int
    signature: str
    history: list[Any] = field(repr=False)
    warnings: tuple[str, ...] = ()


def _layer_macs(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], list[str]]:
    """MACs of every Conv2d/Linear for one example, and the order in which they ran."""
    macs: dict[str, int] = {}
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _PRUNABLE):

            def hook(mod: nn.Module, _inp: Any, out: torch.Tensor, name: str = name) -> None:
                per_output = _macs_per_output(mod)
                macs[name] = macs.get(name, 0) + int(out.numel()) * per_output
                order.append(name)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return macs, order


def _macs_per_output(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return int(layer.in_features)
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return int(layer.in_channels // layer.groups) * int(kh) * int(kw)
    return 0


def _attention_modules(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """``qkv`` layer name -> (attention module name, heads, head width) for timm-style attention.

    The convention (as in timm's ViT): a module with an integer ``num_heads`` and a Linear child
    ``qkv`` whose output is q, k and v side by side, each ``num_heads * head_dim`` wide.
    """
    found = {}
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None)
        qkv = getattr(module, "qkv", None)
        if isinstance(heads, int) and isinstance(qkv, nn.Linear) and qkv.out_features % (3 * heads) == 0:
            prefix = f"{name}." if name else ""
            found[f"{prefix}qkv"] = (name, heads, qkv.out_features // (3 * heads))
    return found


def _build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as exc:
        raise PruningError(f"torch-pruning could not trace the model: {exc}") from exc


def discover(model: nn.Module, example: torch.Tensor, *, ignored: Sequence[str] = ()) -> Discovery:
    """Find the prunable groups of ``model``.

    The output layer (the Conv2d/Linear that runs last) and the ``ignored`` layers keep their
    output channels.

    Raises:
        PlanError: an ignored layer name that is not a module of the model.
    """
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    unknown = [name for name in ignored if name not in modules]
    if unknown:
        known = ", ".join(n for n, m in modules.items() if isinstance(m, _PRUNABLE))
        raise PlanError(f"unknown layer(s) to ignore: {', '.join(unknown)}; layers: {known}")
    macs, order = _layer_macs(model, example)
    if not order:
        raise PlanError("the model has no Conv2d or Linear layer to prune")
    output_layer = order[-1]
    ignored_names = tuple(dict.fromkeys([output_layer, *ignored]))
    layers = {
        name: LayerInfo(
            name=name,
            kind="linear" if isinstance(module, nn.Linear) else "conv",
            in_size=module.in_features if isinstance(module, nn.Linear) else module.in_channels,
            out_size=module.out_features if isinstance(module, nn.Linear) else module.out_channels,
            groups=1 if isinstance(module, nn.Linear) else module.groups,
            macs=macs.get(name, 0),
        )
        for name, module in modules.items()
        if isinstance(module, _PRUNABLE)
    }
    total_macs = sum(macs.values()) or 1
    names = {module: name for name, module in modules.items()}
    attention = _attention_modules(model)
    graph = _build_graph(model, example)
    groups = []
    for group in graph.get_all_groups(
        ignored_layers=[modules[n] for n in ignored_names], root_module_types=list(_PRUNABLE)
    ):
        root_module = group[0].dep.target.module
        root = names.get(root_module)
        if root is None:
            continue
        members: set[str] = set()
        consumers: set[str] = set()
        for dep, _ in group:
            target = dep.target.module
            if isinstance(target, _PRUNABLE) and target in names:
                members.add(names[target])
                if graph.is_in_channel_pruning_fn(dep.handler):
                    consumers.add(names[target])
        share = sum(macs.get(m, 0) for m in members) / total_macs
        if root in attention:
            holder, heads, head_dim = attention[root]
            info = GroupInfo(root, "heads", heads, head_dim, tuple(sorted(members)),
                             tuple(sorted(consumers)), share, holder)
        else:
            size = graph.get_out_channels(root_module)
            info = GroupInfo(root, "channels", int(size), 1, tuple(sorted(members)),
                             tuple(sorted(consumers)), share)
        groups.append(info)
    # Layer order (first execution of any member) is the order AMC-style controllers decide in.
    first_run = {name: index for index, name in reversed(list(enumerate(order)))}
    groups.sort(key=lambda g: min(first_run.get(m, len(order)) for m in g.members))
    macs_total, params = tp.utils.count_ops_and_params(model, example)
    return Discovery(tuple(groups), layers, output_layer, ignored_names, int(macs_total), int(params))


def _importance(kind: str) -> tp.importance.Importance:
    if kind == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if kind == "bn-scale":
        return tp.importance.BNScaleImportance()
    raise PlanError(f"importance {kind!r} is unknown; choose one of: {', '.join(IMPORTANCES)}")


def _accumulate_gradients(
    model: nn.Module, calibration: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn: Any
) -> None:
    model.zero_grad(set_to_none=True)
    model.eval()  # keep BatchNorm statistics fixed: calibration must not change the weights
    seen = False
    for inputs, targets in calibration:
        loss_fn(model(inputs), targets).backward()
        seen = True
    if not seen:
        raise PlanError("importance 'taylor' needs calibration batches; the loader yielded none")


def _out_channel_fn(graph: tp.DependencyGraph, module: nn.Module) -> Any:
    return graph.get_pruner_of_module(module).prune_out_channels


def apply_pruning(
    base: nn.Module,
    example: torch.Tensor,
    *,
    kept: Mapping[str, int],
    groups: Sequence[GroupInfo],
    patterns: Mapping[str, tuple[int, int]],
    importance: str = "magnitude",
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Any = nn.functional.cross_entropy,
) -> PrunedModel:
    """Prune a deep copy of ``base``: keep ``kept[g]`` units of each group, then apply N:M.

    Deterministic: the same inputs give bit-identical weights. Within a group the units with the
    lowest importance go; ties are broken by index (stable sort).

    Raises:
        PlanError: a data-dependent importance without calibration data.
        PruningError: torch-pruning failed, or an N:M mask did not come out exact.
    """
    model = copy.deepcopy(base).eval()
    modules = dict(model.named_modules())
    estimator = _importance(importance)
    if importance == "taylor" and calibration is None:
        raise PlanError("importance 'taylor' needs calibration batches (the training loader)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = _build_graph(model, example)
        for info in groups:
            target = kept.get(info.name, info.size)
            if target >= info.size:
                continue
            root = modules[info.name]
            prune_fn = _out_channel_fn(graph, root)
            channels = info.size * info.unit_width * (3 if info.kind == "heads" else 1)
            if importance == "taylor":
                _accumulate_gradients(model, calibration or [], loss_fn)
            scores = estimator(graph.get_pruning_group(root, prune_fn, list(range(channels))))
            if scores is None:
                raise PruningError(f"importance {importance!r} has no score for group {info.name!r}")
            scores = scores.detach().float().cpu()
            if info.kind == "heads":
                head_scores = scores.view(3, info.size, info.unit_width).mean(dim=(0, 2))
                drop = torch.sort(torch.argsort(head_scores, stable=True)[: info.size - target]).values
                width = info.size * info.unit_width
                indices = [
                    part * width + int(head) * info.unit_width + offset
                    for part in range(3)
                    for head in drop
                    for offset in range(info.unit_width)
                ]
            else:
                indices = sorted(int(i) for i in torch.argsort(scores, stable=True)[: info.size - target])
            try:
                graph.get_pruning_group(root, prune_fn, indices).prune()
            except Exception as exc:
                raise PruningError(f"torch-pruning failed on group {info.name!r}: {exc}") from exc
            if info.attention is not None:
                # torch-pruning resizes the tensors; the module's head count is ours to update.
                modules[info.attention].num_heads = target
        model.zero_grad(set_to_none=True)
    tp_warnings = tuple(str(w.message) for w in caught)
    masks: dict[str, torch.Tensor] = {}
    sparsity: dict[str, float] = {}
    pattern_names: dict[str, str] = {}
    for layer, (n, m) in patterns.items():
        module = modules[layer]
        masks[layer] = apply_nm(module, n, m)
        weight = module.weight  # type: ignore[union-attr]
        if not satisfies_nm(weight, n, m):
            raise PruningError(f"N:M mask on {layer!r} is not exact after pruning")
        sparsity[layer] = float((weight == 0).sum()) / weight.numel()
        pattern_names[layer] = f"{n}:{m}"
    macs, params = tp.utils.count_ops_and_params(model, example)
    kept_now = {info.name: kept.get(info.name, info.size) for info in groups}
    return PrunedModel(
        model=model,
        kept=kept_now,
        sparsity=sparsity,
        patterns=pattern_names,
        masks=masks,
        macs=int(macs),
        params=int(params),
        signature=architecture_signature(model, pattern_names),
        history=graph.pruning_history(),
        warnings=tp_warnings,
    )


def architecture_signature(model: nn.Module, patterns: Mapping[str, str]) -> str:
    """Hash of every parameter's name and shape and of where N:M sparsity sits."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name}:{tuple(parameter.shape)};".encode())
    for name, value in sorted(patterns.items()):
        digest.update(f"{name}={value};".encode())
    return digest.hexdigest()[:16]
