"""Structured pruning with torch-pruning: group discovery and plan application.

The only module that imports ``torch_pruning``. Groups come from its dependency graph (layers
coupled by residual additions, concatenations, depthwise convolutions and attention reshapes share
one group); importance comes from its estimators; removal is ``Group.prune``. hwprune decides only
how many channels each group keeps, and picks the least important ones deterministically.

Decoder LLMs (Llama-style attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` with grouped
key/value heads) are pruned by coupled structures as LLM-Pruner prunes them: one unit is a
key/value head with the query heads that share it (and the matching ``o_proj`` inputs); the gated
MLP's gate/up/down channels are one torch-pruning group. torch-pruning's own GQA head pruning keeps
every key/value head and removes query heads within each, and its tracer does not couple q and k
through rotary embeddings, so those units are removed here with its ``prune_linear_*`` functions.
The residual stream (hidden size) is kept, as LLM-Pruner's block-wise mode keeps it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from search.errors import PlanError, PruningError
from search.pipeline.attention import HeadPrunedAttention
from search.pipeline.device import CPU, ModelDevice, OnDevice, to_device, torch_threads
from search.pipeline.inputs import ModelInput, flat_outputs, primary, rebuild, run
from search.pipeline.inputs import tensors as tensors_of
from search.pipeline.macs import MacCount, count_macs
from search.pipeline.sparsity import satisfies_nm, sparsify

logger = logging.getLogger(__name__)

Importance = Literal["magnitude", "taylor", "lamp", "bn-scale", "llm-pruner", "movement"]
IMPORTANCES: tuple[str, ...] = ("magnitude", "taylor", "lamp", "bn-scale", "llm-pruner", "movement")
_GRADIENT_IMPORTANCES = ("taylor", "llm-pruner", "movement")
COMPENSATIONS: tuple[str, ...] = ("none", "mean")
CALIBRATION_BATCHES = 8  # batches of the training loader for N:M criteria, llm-pruner and movement
CALIBRATION_SEED = 0
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

    ``kind`` is ``channels`` for ordinary groups and ``heads`` for an attention's q, k and v
    projections (a fused ``qkv``, ``parts`` 3, or separate ``query``/``key``/``value``, ``parts``
    1), where whole heads (``unit_width`` channels each, in q, k and v) go at once.
    ``kv-heads`` is a Llama-style attention's key/value head with the query heads sharing it; its
    name is the ``k_proj`` layer and ``unit_width`` the ``o_proj`` inputs one unit holds.
    ``consumers`` are the layers whose input channels are this group's.
    """

    name: str
    kind: Literal["channels", "heads", "kv-heads"]
    size: int
    unit_width: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    mac_share: float
    attention: str | None = None
    parts: int = 1


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
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _HeadLayout:
    """Where an attention's heads sit in a projection's output channels."""

    holder: str
    heads: int
    head_dim: int
    parts: int  # 3 for a fused qkv (q, k and v side by side), 1 for a separate q, k or v


def _attention_modules(model: nn.Module) -> dict[str, _HeadLayout]:
    """Projection layer name -> its attention's head layout, for the layouts torch-pruning groups.

    timm-style: a module with an integer ``num_heads`` and a fused Linear ``qkv`` (q, k and v
    side by side, each ``num_heads * head_dim`` wide). Hugging Face BERT-style (BERT, RoBERTa,
    ELECTRA, DeiT before transformers 5): a module with ``num_attention_heads``,
    ``attention_head_size`` and Linear ``query``, ``key``, ``value``; torch-pruning's graph
    couples the three with the attention output's input channels, so one group holds the heads.
    """
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        heads = getattr(module, "num_heads", None)
        qkv = getattr(module, "qkv", None)
        if isinstance(heads, int) and isinstance(qkv, nn.Linear) and qkv.out_features % (3 * heads) == 0:
            found[f"{prefix}qkv"] = _HeadLayout(name, heads, qkv.out_features // (3 * heads), 3)
        heads = getattr(module, "num_attention_heads", None)
        head_dim = getattr(module, "attention_head_size", None)
        projections = [getattr(module, part, None) for part in ("query", "key", "value")]
        if (isinstance(heads, int) and isinstance(head_dim, int)
                and all(isinstance(p, nn.Linear) and p.out_features == heads * head_dim for p in projections)):
            for part in ("query", "key", "value"):
                found[f"{prefix}{part}"] = _HeadLayout(name, heads, head_dim, 1)
    return found


def _set_head_count(holder: nn.Module, heads: int, head_dim: int) -> None:
    """Give an attention module its new head count, so its own forward reshapes right.

    A Hugging Face config is shared by every layer and cannot hold per-layer head counts, so it
    is left as it was: the pruned model runs in its own code; it is rebuilt by replaying the plan.
    """
    for attribute in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(holder, attribute, None), int):
            setattr(holder, attribute, heads)
    if isinstance(getattr(holder, "all_head_size", None), int):
        setattr(holder, "all_head_size", heads * head_dim)  # noqa: B010


@dataclass(frozen=True, slots=True)
class _GqaAttention:
    """A Llama-style attention block: kv head ``j`` serves query heads ``j*share .. j*share+share-1``."""

    holder: str
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def share(self) -> int:
        return self.heads // self.kv_heads


def _gqa_attentions(model: nn.Module) -> dict[str, _GqaAttention]:
    """``k_proj`` name -> the attention it belongs to, for modules with Linear q/k/v/o_proj children
    and an integer ``head_dim`` (transformers' Llama, Mistral, Qwen2 attention)."""
    found = {}
    for name, module in model.named_modules():
        parts = [getattr(module, f"{p}_proj", None) for p in "qkvo"]
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int) or not all(isinstance(p, nn.Linear) for p in parts):
            continue
        q, k, _, _ = parts
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim  # type: ignore[union-attr]
        if kv_heads == 0 or heads % kv_heads:
            continue
        prefix = f"{name}." if name else ""
        attention = _GqaAttention(name, f"{prefix}q_proj", f"{prefix}k_proj", f"{prefix}v_proj",
                                  f"{prefix}o_proj", heads, kv_heads, head_dim)
        found[attention.k] = attention
    return found


def _mha_modules(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """The ``nn.MultiheadAttention`` modules whose heads ``HeadPrunedAttention`` can remove."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
        and module.bias_k is None and not module.add_zero_attn and module.num_heads > 1
    }


def _prune_mha_heads(model: nn.Module, info: GroupInfo, target: int, importance: str) -> None:
    """Replace an ``nn.MultiheadAttention`` by a ``HeadPrunedAttention`` of its best ``target`` heads.

    A head's score sums its q, k and v rows of ``in_proj_weight`` and its ``out_proj`` columns
    (magnitude, or the gradient criteria as for the other head groups).
    """
    parent_name, _, child = info.name.rpartition(".")
    parent = model.get_submodule(parent_name)
    mha = getattr(parent, child)
    if not isinstance(mha, nn.MultiheadAttention):
        raise PruningError(f"group {info.name!r}: expected nn.MultiheadAttention, found {type(mha).__name__}")
    if importance == "bn-scale":
        raise PruningError(f"importance {importance!r} has no score for group {info.name!r} (no BatchNorm)")
    score_kind = "magnitude" if importance == "lamp" else importance
    heads, dim, embed = mha.num_heads, info.unit_width, mha.embed_dim
    scores = torch.zeros(heads, dtype=torch.float64)
    in_grad = mha.in_proj_weight.grad
    for part in range(3):
        rows = slice(part * embed, (part + 1) * embed)
        grad = None if in_grad is None else in_grad[rows]
        scores += _unit_score(score_kind, mha.in_proj_weight[rows], grad).view(heads, dim).sum(1)
    out_grad = mha.out_proj.weight.grad
    scores += _unit_score(score_kind, mha.out_proj.weight.transpose(0, 1),
                          None if out_grad is None else out_grad.transpose(0, 1)).view(heads, dim).sum(1)
    kept = sorted(int(i) for i in torch.argsort(scores, stable=True)[heads - target:])
    setattr(parent, child, HeadPrunedAttention(mha, kept))


_KNOWN_MODULES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                  nn.Embedding, nn.PReLU, nn.MultiheadAttention)


def _unwrapped_vectors(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    # Parameters of modules torch-pruning has no pruner for: per-channel scales (RMSNorm), whose
    # one dimension is the channel one, and tokens or position tables added to the activations
    # (a ViT's cls_token [1, 1, D] and position_embeddings [1, N, D]), whose last one is.
    # Declared, torch-pruning prunes them without warning that it guessed.
    found = []
    for module in model.modules():
        if isinstance(module, _KNOWN_MODULES):
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.dim() == 1:
                found.append((parameter, 0))
            elif parameter.dim() > 1 and parameter.shape[0] == 1:
                found.append((parameter, parameter.dim() - 1))
    return found


def _build_graph(model: nn.Module, example: ModelInput) -> tp.DependencyGraph:
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example, unwrapped_parameters=_unwrapped_vectors(model)
        )
    except Exception as exc:
        raise PruningError(f"torch-pruning could not trace the model: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Traced:
    """torch-pruning's dependency graph of a base model, traced once and copied per plan.

    ``key`` is what the graph depends on (parameter and buffer names, shapes and
    ``requires_grad``, and the example's bytes: Hugging Face code branches on the mask's values);
    ``shared`` are the objects a copy of the graph must share, not copy (torch-pruning compares
    pruning functions by their pruner instance; autograd nodes hold the traced shapes).
    """

    key: str
    graph: tp.DependencyGraph
    shared: tuple[Any, ...]
    warnings: tuple[str, ...]  # what torch-pruning warned while tracing, reported with every plan


_TRACED: weakref.WeakKeyDictionary[nn.Module, _Traced] = weakref.WeakKeyDictionary()


def _trace_key(base: nn.Module, example: ModelInput) -> str:
    digest = hashlib.sha256()
    for name, parameter in base.named_parameters():
        digest.update(f"p{name}:{tuple(parameter.shape)}:{parameter.requires_grad};".encode())
    for name, buffer in base.named_buffers():
        digest.update(f"b{name}:{tuple(buffer.shape)};".encode())
    for tensor in tensors_of(example):
        digest.update(f"x{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _messages(caught: Sequence[warnings.WarningMessage]) -> tuple[str, ...]:
    """The tracer's and pruner's warnings; a ResourceWarning is some other object the garbage
    collector happened to close meanwhile (a database connection), not the model's."""
    return tuple(str(w.message) for w in caught if not issubclass(w.category, ResourceWarning))


def _traced(base: nn.Module, example: ModelInput) -> _Traced:
    """The graph of ``base`` for ``example``, traced on the first call (in eval mode, as a fresh
    trace runs on an eval copy) and again only when the base's structure or the example changes."""
    key = _trace_key(base, example)
    cached = _TRACED.get(base)
    if cached is not None and cached.key == key:
        return cached
    modes = {module: module.training for module in base.modules()}
    base.eval()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = _build_graph(base, example)
    finally:
        for module, training in modes.items():
            module.training = training
    shared: list[Any] = [graph.ops, *graph.REGISTERED_PRUNERS.values(), *graph.CUSTOMIZED_PRUNERS.values()]
    for node in graph.module2node.values():
        shared.append(node.grad_fn)
        for dep in node.dependencies:
            shared.extend(getattr(fn, "__self__", None) for fn in (dep.trigger, dep.handler))
    cached = _Traced(key, graph, tuple(obj for obj in shared if obj is not None),
                     _messages(caught))
    _TRACED[base] = cached
    return cached


def _copy_with_graph(base: nn.Module, traced: _Traced) -> tuple[nn.Module, tp.DependencyGraph]:
    """An eval copy of ``base`` and a copy of its graph that points at the copy's modules.

    One ``deepcopy`` memo maps every base module to its copy, so the graph copy is what tracing
    the copy would build. The copy's tensors share the base's storage (torch-pruning replaces
    pruned tensors by new ones); ``_unshare`` clones what is left before anything writes in place.
    """
    memo: dict[int, Any] = {}
    for parameter in base.parameters():
        memo[id(parameter)] = type(parameter)(parameter.data, parameter.requires_grad)
    for buffer in base.buffers():
        memo[id(buffer)] = buffer.detach()
    model = copy.deepcopy(base, memo).eval()
    for obj in traced.shared:
        memo[id(obj)] = obj
    # Nodes link to their neighbours: a plain deepcopy recurses along the whole network and
    # overflows the stack on deep models. Every node gets its copy first, so no copy goes deeper
    # than one node's own attributes.
    nodes = list(traced.graph.module2node.values())
    for node in nodes:
        memo[id(node)] = object.__new__(type(node))
    for node in nodes:
        memo[id(node)].__dict__.update(copy.deepcopy(node.__dict__, memo))
    return model, copy.deepcopy(traced.graph, memo)


def _unshare(model: nn.Module, base: nn.Module) -> None:
    """Clone every tensor of ``model`` still sharing storage with ``base`` (bit-identical values)."""
    storages = {t.untyped_storage().data_ptr() for t in (*base.parameters(), *base.buffers()) if t.numel()}
    for parameter in model.parameters():
        if parameter.numel() and parameter.untyped_storage().data_ptr() in storages:
            parameter.data = parameter.data.clone(memory_format=torch.preserve_format)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.numel() and buffer.untyped_storage().data_ptr() in storages:
                module._buffers[name] = buffer.clone(memory_format=torch.preserve_format)


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _count_ops(model: nn.Module, example: ModelInput) -> MacCount:
    """MACs and parameters counted from what runs (``search.pipeline.macs``) on a meta-device copy:
    the counts come from shapes only, so no weight is copied or multiplied. Falls back to the real
    model where the forward needs values (data-dependent branches, e.g. a mask's contents)."""
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = type(parameter)(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    try:
        meta = copy.deepcopy(model, memo)
        for module in meta.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                # Shape-preserving and not counted; on meta its decomposition is a third of the count.
                module.forward = _unchanged  # type: ignore[method-assign,assignment]
        return count_macs(meta, rebuild(example, [t.to("meta") for t in tensors_of(example)]))
    except Exception:  # noqa: BLE001  # any failure on meta: count on the real weights
        return count_macs(model, example)


def _output_layers(model: nn.Module, example: ModelInput) -> tuple[list[str], set[str]]:
    """The Conv2d/Linear layers whose outputs reach what the model returns with no other
    Conv2d/Linear in between: their output channels are the model's output channels.

    Found by walking the autograd graph back from every returned tensor, so a layer that runs
    but feeds nothing returned (an unused pooler) is not one, and every layer writing into a
    returned residual stream (a transformer's hidden states) is. Also returns the layers that
    reach the outputs at all (the live ones).
    """
    producers: dict[Any, str] = {}
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # a frozen layer must leave a trace too (``model`` is a copy)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _PRUNABLE):

            def hook(_mod: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                    producers[out.grad_fn] = name

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            returned = flat_outputs(run(model, example))
    finally:
        for handle in handles:
            handle.remove()
    roots = [t.grad_fn for t in returned if t.grad_fn is not None]

    def walk(stop_at_layers: bool) -> set[str]:
        found: set[str] = set()
        pending: list[Any] = list(roots)
        seen: set[Any] = set()
        while pending:
            node = pending.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in producers:
                found.add(producers[node])
                if stop_at_layers:
                    continue
            pending.extend(child for child, _ in node.next_functions)
        return found

    return sorted(walk(stop_at_layers=True)), walk(stop_at_layers=False)


def discover(
    model: nn.Module, example: ModelInput, *, ignored: Sequence[str] = (), hidden_size: bool = False
) -> Discovery:
    """Find the prunable groups of ``model``.

    The output layers (those whose outputs reach what the model returns, see
    ``_output_layers``) and the ``ignored`` layers keep their output channels, and so does every
    group holding one of them: a transformer's hidden size stays whole when its hidden states
    are returned. ``output_layer`` names the last of them to run.

    A transformer's hidden size (a group holding an ``Embedding`` or ``LayerNorm``: the residual
    stream) is a group only with ``hidden_size``; torch-pruning then prunes the embeddings,
    every LayerNorm and every consumer with it.

    Raises:
        PlanError: an ignored layer name that is not a module of the model.
    """
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    unknown = [name for name in ignored if name not in modules]
    if unknown:
        known = ", ".join(n for n, m in modules.items() if isinstance(m, _PRUNABLE))
        raise PlanError(f"unknown layer(s) to ignore: {', '.join(unknown)}; layers: {known}")
    counted = count_macs(model, example)
    macs, order, mha_macs = counted.layers, counted.order, counted.attention
    if not order:
        raise PlanError("the model has no Conv2d or Linear layer to prune")
    outputs, live = _output_layers(model, example)
    outputs = outputs or [order[-1]]
    last_run = {name: index for index, name in enumerate(order)}
    output_layer = max(outputs, key=lambda name: last_run.get(name, -1))
    ignored_names = tuple(dict.fromkeys([output_layer, *sorted(outputs), *ignored]))
    layers = _layers(modules, macs, live)
    total_macs = counted.total or 1
    names = {module: name for name, module in modules.items()}
    attention = _attention_modules(model)
    gqa = _gqa_attentions(model)
    # q/k/v are never roots: their units are the kv-head groups below (see the module docstring).
    projections = {name for a in gqa.values() for name in (a.q, a.k, a.v)}
    graph = _build_graph(model, example)
    groups = []
    for group in graph.get_all_groups(
        ignored_layers=[modules[n] for n in (*ignored_names, *sorted(projections))],
        root_module_types=list(_PRUNABLE),
    ):
        root = names.get(group[0].dep.target.module)
        if root is None or (live and root not in live):
            continue  # a layer whose output nothing returned reads is no decision
        info = _channel_group(group, graph, root, names, projections, attention.get(root),
                              share_of=lambda members: sum(macs.get(m, 0) for m in members) / total_macs,
                              hidden_size=hidden_size)
        if info is not None:
            groups.append(info)
    groups += _attention_groups(model, gqa, ignored_names, macs, mha_macs, total_macs)
    # Layer order (first execution of any member) is the order AMC-style controllers decide in.
    first_run = {name: index for index, name in reversed(list(enumerate(order)))}
    groups.sort(key=lambda g: min(first_run.get(m, len(order)) for m in g.members))
    return Discovery(tuple(groups), layers, output_layer, ignored_names, counted.total, counted.params)


def _layers(modules: Mapping[str, nn.Module], macs: Mapping[str, int], live: set[str]) -> dict[str, LayerInfo]:
    return {
        name: LayerInfo(
            name=name,
            kind="linear" if isinstance(module, nn.Linear) else "conv",
            in_size=module.in_features if isinstance(module, nn.Linear) else module.in_channels,
            out_size=module.out_features if isinstance(module, nn.Linear) else module.out_channels,
            groups=1 if isinstance(module, nn.Linear) else module.groups,
            macs=macs.get(name, 0),
        )
        for name, module in modules.items()
        # a layer nothing returned reads (an unused pooler) is offered nothing, N:M included
        if isinstance(module, _PRUNABLE) and (not live or name in live)
    }


def _channel_group(group: Any, graph: tp.DependencyGraph, root: str, names: Mapping[nn.Module, str],
                   projections: set[str], layout: _HeadLayout | None, *,
                   share_of: Callable[[set[str]], float], hidden_size: bool) -> GroupInfo | None:
    """One torch-pruning group as a decision (channels, or an attention's heads), or None where
    it is no decision of the space (the residual stream unless ``hidden_size``)."""
    members: set[str] = set()
    consumers: set[str] = set()
    residual_stream = False
    for dep, _ in group:
        target = dep.target.module
        if isinstance(target, nn.MultiheadAttention):
            # Its embedding width is heads x head width: cutting it would change the width of the
            # heads its own head group removes (and fail there). Its heads are the decision.
            return None
        residual_stream = residual_stream or isinstance(target, (nn.Embedding, nn.LayerNorm))
        if isinstance(target, _PRUNABLE) and target in names:
            members.add(names[target])
            if graph.is_in_channel_pruning_fn(dep.handler):
                consumers.add(names[target])
    if residual_stream and not hidden_size:
        return None  # opt-in: the hidden size touches every layer, and accuracy with it
    if consumers & projections and not residual_stream:
        return None  # the residual stream of a decoder LLM: kept whole (opt-in above)
    share = share_of(members)
    root_module = group[0].dep.target.module
    size = graph.get_out_channels(root_module)
    if layout is not None and size == layout.parts * layout.heads * layout.head_dim:
        return GroupInfo(root, "heads", layout.heads, layout.head_dim, tuple(sorted(members)),
                         tuple(sorted(consumers)), share, layout.holder, layout.parts)
    return GroupInfo(root, "channels", int(size), 1, tuple(sorted(members)), tuple(sorted(consumers)), share)


def _attention_groups(model: nn.Module, gqa: Mapping[str, _GqaAttention], ignored_names: Sequence[str],
                      macs: Mapping[str, int], mha_macs: Mapping[str, int], total_macs: int) -> list[GroupInfo]:
    """The head groups of ``nn.MultiheadAttention`` modules and the kv-head groups of GQA attention."""
    groups = []
    for name, mha in _mha_modules(model).items():
        if name in ignored_names:
            continue
        head_dim = mha.embed_dim // mha.num_heads
        # in_proj is no Linear module (no hook saw it): q, k, v and out projections are 4 E x E.
        share = mha_macs.get(name, 0) / total_macs
        groups.append(GroupInfo(name, "heads", mha.num_heads, head_dim, (name, f"{name}.out_proj"),
                                (f"{name}.out_proj",), share, name, 3))
    for name, a in gqa.items():
        if name in ignored_names:
            continue
        coupled = tuple(sorted((a.q, a.k, a.v, a.o)))
        share = sum(macs.get(m, 0) for m in coupled) / total_macs
        groups.append(GroupInfo(name, "kv-heads", a.kv_heads, a.share * a.head_dim, coupled, (a.o,),
                                share, a.holder))
    return groups


def _importance(kind: str) -> tp.importance.Importance:
    if kind == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    if kind == "llm-pruner":
        # LLM-Pruner's element-wise first-order Taylor, summed over every member of the group.
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    if kind == "movement":
        return _MovementImportance()
    if kind == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if kind == "bn-scale":
        return tp.importance.BNScaleImportance()
    raise PlanError(f"importance {kind!r} is unknown; choose one of: {', '.join(IMPORTANCES)}")


def _unit_score(kind: str, weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Per-row score of a ``[units, ...]`` weight slice (rows are channels)."""
    w = weight.detach().flatten(1).double()
    if kind in _GRADIENT_IMPORTANCES:
        if grad is None:
            raise PruningError(f"importance {kind!r}: no gradient reached a pruned layer")
        g = grad.detach().flatten(1).double()
        # For movement, ``grad`` holds the accumulated score itself (see _accumulate_movement).
        return g.sum(1) if kind == "movement" else (w * g).abs().sum(1)
    return w.square().sum(1)


class _MovementImportance(tp.importance.Importance):  # type: ignore[misc]
    """Movement pruning's score ``S = -sum_t W_t * dL/dW_t`` (Sanh et al., 2020), summed over the group.

    ``S`` accumulates while a scratch copy of the model fine-tunes on the calibration batches
    (``_accumulate_movement``), and arrives in each weight's ``.grad``.
    """

    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        for item in group:
            layer, handler = item.dep.target.module, item.dep.handler
            if not isinstance(layer, _PRUNABLE) or layer.weight.grad is None:
                continue
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                continue  # depthwise: one weight per channel, the out-channel entry covers it
            if handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                weight, grad = layer.weight, layer.weight.grad
            elif handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                weight, grad = layer.weight.transpose(0, 1), layer.weight.grad.transpose(0, 1)
            else:
                continue
            index = torch.tensor(item.idxs, dtype=torch.long)
            # Scores land on the root's channels, which is what the caller ranks.
            score = torch.zeros(len(group[0].idxs), dtype=torch.float64)
            score.index_add_(0, torch.tensor(item.root_idxs, dtype=torch.long),
                             _unit_score("movement", weight[index], grad[index]))
            total = score if total is None else total + score
        return total


def calibration_batches(
    loader: Iterable[tuple[ModelInput, torch.Tensor]], count: int = CALIBRATION_BATCHES
) -> list[tuple[ModelInput, torch.Tensor]]:
    """The first ``count`` batches of ``loader``, the same on every call.

    A loader that shuffles with a ``torch.Generator`` is reseeded for the draw and its state
    restored afterwards, so a trial and its re-materialisation calibrate on the same samples.
    """
    generator = getattr(loader, "generator", None)
    saved = generator.get_state() if isinstance(generator, torch.Generator) else None
    if isinstance(generator, torch.Generator):
        generator.manual_seed(CALIBRATION_SEED)
    batches = []
    try:
        for batch in loader:
            batches.append(batch)
            if len(batches) >= count:
                break
    finally:
        if isinstance(generator, torch.Generator) and saved is not None:
            generator.set_state(saved)
    if not batches:
        raise PlanError("calibration needs batches; the training loader yielded none")
    return batches


def _accumulate_gradients(
    model: nn.Module, calibration: Iterable[tuple[ModelInput, torch.Tensor]], loss_fn: Any
) -> None:
    model.zero_grad(set_to_none=True)
    model.eval()  # keep BatchNorm statistics fixed: calibration must not change the weights
    seen = False
    for inputs, targets in calibration:
        loss_fn(primary(run(model, inputs)), targets).backward()
        seen = True
    if not seen:
        raise PlanError("a gradient importance needs calibration batches; the loader yielded none")


MOVEMENT_LR = 3e-4  # AdamW, as recovery fine-tunes by default (search.config.RecoverySettings)


def _accumulate_movement(
    model: nn.Module, calibration: Sequence[tuple[ModelInput, torch.Tensor]], loss_fn: Any
) -> None:
    """Leave movement pruning's score ``-sum_t W_t * dL/dW_t`` in each weight's ``.grad``.

    The weights move: a scratch copy of ``model`` takes one AdamW step per calibration batch (in
    eval mode, so BatchNorm statistics stay put) while the score accumulates, as movement pruning
    does during fine-tuning; ``model`` itself is left as it was. Weights that move away from zero
    score high. Deterministic for the fixed thread count ``apply_pruning`` sets.
    """
    if not calibration:
        raise PlanError("a gradient importance needs calibration batches; the loader yielded none")
    scratch = copy.deepcopy(model).eval()
    parameters = dict(scratch.named_parameters())
    scores = {name: torch.zeros_like(p) for name, p in parameters.items()}
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=MOVEMENT_LR, weight_decay=0.0)
    for inputs, targets in calibration:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(primary(run(scratch, inputs)), targets).backward()
        with torch.no_grad():
            for name, p in parameters.items():
                if p.grad is not None:
                    scores[name] -= p * p.grad
        optimizer.step()
    for name, p in model.named_parameters():
        p.grad = scores[name]


def _out_channel_fn(graph: tp.DependencyGraph, module: nn.Module) -> Any:
    return graph.get_pruner_of_module(module).prune_out_channels


def _prune_kv_heads(model: nn.Module, info: GroupInfo, target: int, importance: str) -> None:
    """Remove the least important kv heads of ``info`` with the query heads that share them."""
    modules = dict(model.named_modules())
    attention = _gqa_attentions(model)[info.name]
    q, k, v, o = (modules[name] for name in (attention.q, attention.k, attention.v, attention.o))
    if not all(isinstance(layer, nn.Linear) for layer in (q, k, v, o)):
        raise PruningError(f"group {info.name!r}: q/k/v/o_proj must be Linear layers")
    if importance in ("bn-scale",):
        raise PruningError(f"importance {importance!r} has no score for group {info.name!r} (no BatchNorm)")
    dim, share = attention.head_dim, attention.share
    score_kind = "magnitude" if importance == "lamp" else importance  # LAMP ranks as magnitude within a layer
    scores = torch.zeros(attention.kv_heads, dtype=torch.float64)
    # LLM-Pruner's group aggregation: the unit's score is the sum over every coupled weight row.
    for layer, rows_per_head, transpose in ((q, share * dim, False), (k, dim, False), (v, dim, False),
                                            (o, share * dim, True)):
        weight = layer.weight.transpose(0, 1) if transpose else layer.weight
        grad = layer.weight.grad
        grad = grad.transpose(0, 1) if grad is not None and transpose else grad
        per_row = _unit_score(score_kind, weight, grad)
        scores += per_row.view(attention.kv_heads, rows_per_head).sum(1)
    drop = sorted(int(i) for i in torch.argsort(scores, stable=True)[: info.size - target])
    q_rows = [h * share * dim + j for h in drop for j in range(share * dim)]
    kv_rows = [h * dim + j for h in drop for j in range(dim)]
    try:
        tp.prune_linear_out_channels(q, q_rows)
        tp.prune_linear_out_channels(k, kv_rows)
        tp.prune_linear_out_channels(v, kv_rows)
        tp.prune_linear_in_channels(o, q_rows)
    except Exception as exc:
        raise PruningError(f"torch-pruning failed on group {info.name!r}: {exc}") from exc
    holder = modules[attention.holder]
    _set_head_count(holder, target * share, dim)
    if isinstance(getattr(holder, "num_key_value_heads", None), int):
        setattr(holder, "num_key_value_heads", target)  # noqa: B010


def _is_consumer(module: nn.Module) -> bool:
    """A layer whose removed input channels can be compensated in its output (not depthwise)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def input_means(model: nn.Module, batches: Sequence[tuple[ModelInput, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each input channel (feature) of every dense Conv2d and Linear of ``model`` over
    ``batches``, in float64, by layer name: what a removed channel fed its consumer on average."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], name: str) -> None:
        x = args[0].detach().double()
        flat = x.transpose(0, 1).flatten(1) if isinstance(module, nn.Conv2d) else x.flatten(0, -2).T
        sums[name] = sums[name] + flat.sum(1) if name in sums else flat.sum(1)
        counts[name] = counts.get(name, 0) + flat.shape[1]

    handles = [module.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
               for name, module in model.named_modules() if _is_consumer(module)]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for inputs, _targets in batches:
                run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return {name: total / counts[name] for name, total in sums.items()}


def _compensations(group: tp.Group, names: Mapping[nn.Module, str],
                   means: Mapping[str, torch.Tensor]) -> list[tuple[nn.Conv2d | nn.Linear, torch.Tensor]]:
    """For each consumer of ``group`` (a layer whose input channels it removes): the layer and
    the shift its output loses on average, ``W[:, removed] @ mean[removed]`` (a convolution's
    kernel summed over space: exact away from zero padding). Taken before the group is pruned."""
    shifts = []
    for dep, idxs in group:
        layer = dep.target.module
        if dep.handler not in (tp.prune_conv_in_channels, tp.prune_linear_in_channels) or not _is_consumer(layer):
            continue
        mean = means.get(names.get(layer, ""))
        if mean is None or not len(idxs):
            continue
        index = torch.tensor(sorted(int(i) for i in idxs), dtype=torch.long)
        weight = layer.weight.detach().double()[:, index]
        if weight.dim() > 2:
            weight = weight.flatten(2).sum(2)
        shifts.append((layer, weight @ mean[index]))
    return shifts


def _compensate(graph: tp.DependencyGraph, layer: nn.Conv2d | nn.Linear, shift: torch.Tensor) -> None:
    """Add ``shift`` back to ``layer``'s output: into its bias, or into the running mean of the
    BatchNorm it alone feeds; a layer with neither is left as it is. New tensors, not in-place
    writes: until ``_unshare`` the copy's tensors are the base model's."""
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.data = layer.bias.data + shift.to(layer.bias.dtype)
            return
        node = graph.module2node.get(layer)
        after = [out.module for out in node.outputs] if node is not None else []
        norm = after[0] if len(after) == 1 else None
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and isinstance(norm.running_mean, torch.Tensor):
            norm.running_mean = norm.running_mean - shift.to(norm.running_mean.dtype)


# base model -> (its weights' versions and the calibration data's hash, the input means)
_MEANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], dict[str, torch.Tensor]]] = \
    weakref.WeakKeyDictionary()


def _base_means(base: nn.Module, batches: Sequence[tuple[ModelInput, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``input_means`` of ``base``, measured again only when its tensors or the data change."""
    digest = hashlib.sha256()
    for inputs, _targets in batches:
        for tensor in tensors_of(inputs):
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    key = (tuple((t.data_ptr(), t._version) for t in (*base.parameters(), *base.buffers())), digest.hexdigest())
    cached = _MEANS.get(base)
    if cached is not None and cached[0] == key:
        return cached[1]
    means = input_means(base, batches)
    _MEANS[base] = (key, means)
    return means


def _calibrated(importance: str, nm_criterion: str, patterns: Mapping[str, tuple[int, int]], compensation: str,
                calibration: object) -> bool:
    """Whether the importance or the N:M criterion calibrates on data; refuses an unknown
    compensation, and any of the three that needs data without ``calibration``."""
    if compensation not in COMPENSATIONS:
        raise PlanError(f"compensation {compensation!r} is unknown; choose one of: {', '.join(COMPENSATIONS)}")
    needs_data = importance in _GRADIENT_IMPORTANCES or bool(nm_criterion != "magnitude" and patterns)
    if (needs_data or compensation != "none") and calibration is None:
        what = (f"importance {importance!r}" if importance in _GRADIENT_IMPORTANCES
                else f"N:M criterion {nm_criterion!r}" if needs_data else f"compensation {compensation!r}")
        raise PlanError(f"{what} needs calibration batches (the bundle's training loader)")
    return needs_data


def apply_pruning(
    base: nn.Module,
    example: ModelInput,
    *,
    kept: Mapping[str, int],
    groups: Sequence[GroupInfo],
    patterns: Mapping[str, tuple[int, int]],
    importance: str = "magnitude",
    nm_criterion: str = "magnitude",
    calibration: Iterable[tuple[ModelInput, torch.Tensor]] | None = None,
    loss_fn: Any = nn.functional.cross_entropy,
    retrace: bool = False,
    device: ModelDevice = CPU,
    compensation: str = "none",
) -> PrunedModel:
    """Prune a deep copy of ``base``: keep ``kept[g]`` units of each group, then apply N:M.

    Deterministic: the same inputs give bit-identical weights. Within a group the units with the
    lowest importance go; ties are broken by index (stable sort). N:M masks follow
    ``nm_criterion`` (see ``search.pipeline.sparsity.sparsify``) on the channel-pruned model.

    torch-pruning's dependency graph is traced once per base model and example and copied with
    the model for each plan (``_copy_with_graph``); importance is computed on the copy as each
    group is pruned, since a group's scores read layers earlier groups have already pruned.
    ``retrace`` traces a fresh graph on the copy instead (the slower path; the results are
    bit-identical, which tests/search_tests/test_replay.py checks).

    Calibration runs on ``device``: on a GPU the copy is traced afresh (the copied graph shares the
    base's tensors until pruning replaces them, and the user's model must not move), moved there
    for the calibrated steps, and returned on the CPU like every pruned model.

    ``compensation`` "mean" adds what each removed channel fed its consumers on average (over the
    calibration batches, measured on ``base``) back into the consumer's bias or the running mean
    of the BatchNorm after it: a pretrained network loses the constant part of a removed channel's
    output, which otherwise shifts every later activation.

    Raises:
        PlanError: a data-dependent importance or N:M criterion without calibration data.
        PruningError: torch-pruning failed, or an N:M mask did not come out exact.
    """
    needs_data = _calibrated(importance, nm_criterion, patterns, compensation, calibration)
    on_device = bool(needs_data) and device.kind != "cpu"
    retrace = retrace or on_device
    with torch_threads(1):  # replays must be bit-identical
        batches = calibration_batches(calibration) if calibration is not None and (
            needs_data or compensation != "none") else []
        # Measured on the base, on the CPU, before the copy exists; cached per base and data.
        means = _base_means(base, batches) if compensation != "none" else None
        few = batches if needs_data else []
        if on_device:
            few = to_device(few, device.torch)
            calibration = OnDevice(calibration or [], device.torch)
        # On a GPU the calibrated steps are model work: they hold the device (search.pipeline.device).
        with warnings.catch_warnings(record=True) as caught, device.work() if on_device else nullcontext():
            warnings.simplefilter("always")
            model, graph, trace_warnings = _copy_for_plan(base, example, retrace=retrace,
                                                          device=device if on_device else CPU)
            _prune_groups(model, graph, groups, kept, importance, calibration=calibration, few=few, loss_fn=loss_fn,
                          means=means)
        tp_warnings = trace_warnings + _messages(caught)
        if not retrace:
            _unshare(model, base)  # before N:M masks are written in place
        with device.work() if on_device else nullcontext():
            masks = sparsify(model, patterns, criterion=nm_criterion, calibration=[x for x, _ in few])
        if on_device:
            model.to("cpu")
            masks = {name: mask.to("cpu") for name, mask in masks.items()}
    sparsity, pattern_names = _exact_patterns(model, patterns)
    counted = count_macs(model, example) if retrace else _count_ops(model, example)
    return PrunedModel(
        model=model,
        kept={info.name: kept.get(info.name, info.size) for info in groups},
        sparsity=sparsity,
        patterns=pattern_names,
        masks=masks,
        macs=counted.total,
        params=counted.params,
        signature=architecture_signature(model, pattern_names),
        warnings=tp_warnings,
    )


def _copy_for_plan(base: nn.Module, example: ModelInput, *, retrace: bool,
                   device: ModelDevice) -> tuple[nn.Module, tp.DependencyGraph, tuple[str, ...]]:
    """A copy of ``base`` to prune, its dependency graph and the trace's warnings: the graph
    traced once per base and copied with the model, or (``retrace``) traced afresh on a deep copy,
    which may then move to a GPU ``device`` (in place: the graph's modules stay the ones it traced)."""
    if not retrace:
        traced = _traced(base, example)
        model, graph = _copy_with_graph(base, traced)
        return model, graph, traced.warnings
    model = copy.deepcopy(base).eval()
    graph = _build_graph(model, example)
    if device.kind != "cpu":
        model.to(device.torch)
    return model, graph, ()


def _prune_groups(model: nn.Module, graph: tp.DependencyGraph, groups: Sequence[GroupInfo],
                  kept: Mapping[str, int], importance: str, *,
                  calibration: Iterable[tuple[ModelInput, torch.Tensor]] | None,
                  few: Sequence[tuple[ModelInput, torch.Tensor]], loss_fn: Any,
                  means: Mapping[str, torch.Tensor] | None = None) -> None:
    """Cut every group of ``model`` to its kept width, lowest importance first (compensating
    each consumer's lost mean input when ``means`` are given)."""
    estimator = _importance(importance)
    modules = dict(model.named_modules())
    compensated = (means, {module: name for name, module in modules.items()}) if means is not None else None
    # nn.MultiheadAttention heads last: their module is replaced, which the graph (built on the
    # original) would not know about for the groups after them.
    mha = [info for info in groups if isinstance(modules.get(info.name), nn.MultiheadAttention)]
    for info in [*(g for g in groups if g not in mha), *mha]:
        target = kept.get(info.name, info.size)
        if target >= info.size:
            continue
        if importance == "taylor":
            _accumulate_gradients(model, calibration or [], loss_fn)
        elif importance == "movement":
            _accumulate_movement(model, few, loss_fn)
        elif importance in _GRADIENT_IMPORTANCES:
            _accumulate_gradients(model, few, loss_fn)
        if info.kind == "kv-heads":
            with torch.no_grad():
                _prune_kv_heads(model, info, target, importance)
            continue
        if isinstance(modules.get(info.name), nn.MultiheadAttention):
            with torch.no_grad():
                _prune_mha_heads(model, info, target, importance)
            continue
        _prune_group(graph, modules, info, target, importance, estimator, compensated)
    model.zero_grad(set_to_none=True)


def _exact_patterns(model: nn.Module, patterns: Mapping[str, tuple[int, int]]) -> tuple[dict[str, float],
                                                                                        dict[str, str]]:
    """Each N:M layer's sparsity and pattern name, after checking its mask came out exact."""
    modules = dict(model.named_modules())
    sparsity: dict[str, float] = {}
    pattern_names: dict[str, str] = {}
    for layer, (n, m) in patterns.items():
        weight = modules[layer].weight  # type: ignore[union-attr]
        if not satisfies_nm(weight, n, m):
            raise PruningError(f"N:M mask on {layer!r} is not exact after pruning")
        sparsity[layer] = float((weight == 0).sum()) / weight.numel()
        pattern_names[layer] = f"{n}:{m}"
    return sparsity, pattern_names


def _prune_group(
    graph: tp.DependencyGraph,
    modules: Mapping[str, nn.Module],
    info: GroupInfo,
    target: int,
    importance: str,
    estimator: tp.importance.Importance,
    compensated: tuple[Mapping[str, torch.Tensor], Mapping[nn.Module, str]] | None = None,
) -> None:
    root = modules[info.name]
    prune_fn = _out_channel_fn(graph, root)
    channels = info.size * info.unit_width * info.parts
    scores = estimator(graph.get_pruning_group(root, prune_fn, list(range(channels))))
    if scores is None:
        raise PruningError(f"importance {importance!r} has no score for group {info.name!r}")
    scores = scores.detach().float().cpu()
    if info.kind == "heads":
        # A head's score is the mean over its channels in every coupled layer (torch-pruning has
        # already reduced the group's layers onto the root's channels).
        head_scores = scores.view(info.parts, info.size, info.unit_width).mean(dim=(0, 2))
        drop = torch.sort(torch.argsort(head_scores, stable=True)[: info.size - target]).values
        width = info.size * info.unit_width
        indices = [
            part * width + int(head) * info.unit_width + offset
            for part in range(info.parts)
            for head in drop
            for offset in range(info.unit_width)
        ]
    else:
        indices = sorted(int(i) for i in torch.argsort(scores, stable=True)[: info.size - target])
    group = graph.get_pruning_group(root, prune_fn, indices)
    shifts = _compensations(group, compensated[1], compensated[0]) if compensated is not None else []
    try:
        group.prune()
    except Exception as exc:
        raise PruningError(f"torch-pruning failed on group {info.name!r}: {exc}") from exc
    for layer, shift in shifts:
        _compensate(graph, layer, shift)
    if info.attention is not None:
        # torch-pruning resizes the tensors; the module's head count is ours to update.
        _set_head_count(modules[info.attention], target, info.unit_width)


def architecture_signature(model: nn.Module, patterns: Mapping[str, str]) -> str:
    """Hash of every parameter's name and shape and of where N:M sparsity sits."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name}:{tuple(parameter.shape)};".encode())
    for name, value in sorted(patterns.items()):
        digest.update(f"{name}={value};".encode())
    return digest.hexdigest()[:16]
