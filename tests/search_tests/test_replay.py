"""A plan applied on a copy of the dependency graph traced once equals a plan applied on a freshly
traced graph: the same weights, buffers, counts, signature and ONNX bytes, on every zoo
architecture and on Hugging Face BERT and ViT models, for several plans in a row."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hardware_profiles import load_profile
from search.examples.zoo import ARCHITECTURES, make_architecture, token_ids
from search.pipeline.onnx_export import export_onnx
from search.pipeline.plan import Plan
from search.pipeline.pruning import PrunedModel
from search.pipeline.space import SearchSpace, apply, build_space

transformers = pytest.importorskip("transformers")

PROFILES = ("cpu-ort-fp32", "ampere-trt-fp16")  # the second runs 2:4, so plans carry N:M layers


def _bert() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return transformers.BertForSequenceClassification(config).eval(), example


def _vit() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
    return transformers.ViTForImageClassification(config).eval(), torch.randn(1, 3, 32, 32)


class _Mha(nn.Module):
    """``nn.MultiheadAttention``: its heads are removed outside torch-pruning's graph."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.norm = nn.LayerNorm(64)  # the residual stream is kept whole (the hidden size is opt-in)
        self.fc = nn.Linear(64, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        result: torch.Tensor = self.head(torch.relu(self.fc(h)).mean(1))
        return result


def _zoo(name: str) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: make_architecture(name, resolution=32)


MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    **{name: _zoo(name) for name in ARCHITECTURES},
    "hf-bert": _bert,
    "hf-vit": _vit,
    "mha": lambda: (_Mha().eval(), torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0))),
}


def _plans(space: SearchSpace, count: int) -> list[Plan]:
    rng = random.Random(0)
    plans = [space.uniform_plan(0.5)]
    for _ in range(count - 1):
        plan = space.random_plan(rng)
        plans.append(plan)
    return plans


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_same(replayed: PrunedModel, traced: PrunedModel, tmp_path: Path, example: Any) -> None:
    ours, theirs = replayed.model.state_dict(), traced.model.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name
    assert (replayed.kept, replayed.macs, replayed.params) == (traced.kept, traced.macs, traced.params)
    assert (replayed.signature, replayed.sparsity, replayed.patterns) == (traced.signature, traced.sparsity,
                                                                          traced.patterns)
    assert replayed.warnings == traced.warnings
    assert sorted(replayed.masks) == sorted(traced.masks)
    assert all(torch.equal(replayed.masks[k], traced.masks[k]) for k in traced.masks)
    a = export_onnx(replayed.model, example, tmp_path / "replayed", check=False)
    b = export_onnx(traced.model, example, tmp_path / "traced", check=False)
    assert a.path.read_bytes() == b.path.read_bytes()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Exporting aten.{2}index operator:UserWarning")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_replayed_apply_equals_a_fresh_trace(name: str, tmp_path: Path) -> None:
    model, example = MODELS[name]()
    space = build_space(model, example, [load_profile(p) for p in PROFILES])
    assert space.groups
    before = _state(model)
    # Several plans on one base: each starts from the graph as traced, not as the last one left it.
    for index, plan in enumerate(_plans(space, 3)):
        replayed = apply(model, example, space, plan)
        traced = apply(model, example, space, plan, retrace=True)
        _assert_same(replayed, traced, tmp_path / str(index), example)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base shares storage, never written


def _calibration(model: nn.Module, example: Any) -> list[tuple[Any, torch.Tensor]]:
    with torch.no_grad():
        if isinstance(example, torch.Tensor) and example.dtype == torch.long:
            batches = [token_ids(2, example.shape[1], seed=seed) for seed in (1, 2)]
        else:
            batches = [torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        return [(x, model(x).argmax(dim=1)) for x in batches]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Exporting aten.{2}index operator:UserWarning")
@pytest.mark.parametrize(("name", "importance", "nm_criterion"), [
    ("resnet18", "taylor", "wanda"),
    ("resnet18", "lamp", "magnitude"),
    ("resnet18", "bn-scale", "magnitude"),
    ("mobilenetv2", "movement", "sparsegpt"),
    ("llama", "llm-pruner", "magnitude"),
    ("transformer", "taylor", "magnitude"),
])
def test_replay_with_every_criterion(name: str, importance: str, nm_criterion: str, tmp_path: Path) -> None:
    model, example = MODELS[name]()
    space = build_space(model, example, [load_profile(p) for p in PROFILES])
    calibration = _calibration(model, example)
    plan = _plans(space, 2)[1]
    replayed = apply(model, example, space, plan, importance=importance, nm_criterion=nm_criterion,
                     calibration=calibration)
    traced = apply(model, example, space, plan, importance=importance, nm_criterion=nm_criterion,
                   calibration=calibration, retrace=True)
    _assert_same(replayed, traced, tmp_path, example)


def test_a_base_changed_in_shape_is_traced_again() -> None:
    model, example = make_architecture("resnet18", resolution=32)
    space = build_space(model, example, [load_profile("cpu-ort-fp32")])
    apply(model, example, space, space.uniform_plan(0.5))
    model.fc = nn.Linear(128, 7)  # a new head (width 16: 128 features in): another graph
    space = build_space(model, example, [load_profile("cpu-ort-fp32")])
    replayed = apply(model, example, space, space.uniform_plan(0.5))
    assert replayed.model(example).shape == (1, 7)
    traced = apply(model, example, space, space.uniform_plan(0.5), retrace=True)
    assert replayed.signature == traced.signature


def test_a_deep_network_replays() -> None:
    # 12 blocks: the graph's nodes link along the whole network, deeper than Python's recursion limit
    # allows a plain deepcopy to follow.
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                                    intermediate_size=64, image_size=16, patch_size=8, num_labels=4)
    model, example = transformers.ViTForImageClassification(config).eval(), torch.randn(1, 3, 16, 16)
    space = build_space(model, example, [load_profile("cpu-ort-fp32")])
    replayed = apply(model, example, space, space.uniform_plan(0.5))
    traced = apply(model, example, space, space.uniform_plan(0.5), retrace=True)
    ours, theirs = replayed.model.state_dict(), traced.model.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
