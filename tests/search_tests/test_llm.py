"""Decoder LLMs (Llama-style, from a transformers config): coupled groups, pruning, ONNX, a short search."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from hardware_profiles import load_profile
from search.examples.zoo import tiny_llama, token_ids
from search.pipeline.onnx_export import export_onnx
from search.pipeline.plan import Plan
from search.pipeline.pruning import discover
from search.pipeline.space import SearchSpace, apply, build_space
from search.pipeline.sparsity import satisfies_nm

pytest.importorskip("transformers")
# transformers' mask code turns shape checks into Python booleans while traced and indexes with
# non-negative aranges; export_onnx compares ONNX Runtime with torch, which is the real check.
def TRACED_MASKS(test: Callable[..., None]) -> Callable[..., None]:  # noqa: N802
    test = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")(test)
    index_note = "ignore:Exporting aten.{2}index operator:UserWarning"
    marked: Callable[..., None] = pytest.mark.filterwarnings(index_note)(test)
    return marked


ATTN = "model.model.layers.{}.self_attn"
MLP = "model.model.layers.{}.mlp"


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, torch.Tensor, SearchSpace]:
    # 4 query heads share 2 kv heads (2 each), head_dim 16; MLP 128 wide.
    model = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    example = token_ids(1, 16)
    return model, example, build_space(model, example, [load_profile("ampere-trt-fp16")])


def _calibration(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = [token_ids(4, 16, seed=seed) for seed in (1, 2)]
    with torch.no_grad():
        return [(x, model(x).argmax(dim=1)) for x in ids]


def test_groups_are_llm_pruner_couplings(llama: tuple[nn.Module, torch.Tensor, SearchSpace]) -> None:
    model, example, _ = llama
    groups = {g.name: g for g in discover(model, example).groups}
    attn, mlp = ATTN.format(0), MLP.format(0)
    heads = groups[f"{attn}.k_proj"]
    assert (heads.kind, heads.size, heads.unit_width) == ("kv-heads", 2, 32)
    assert heads.members == tuple(sorted(f"{attn}.{p}_proj" for p in "qkvo"))
    assert heads.consumers == (f"{attn}.o_proj",)
    channels = groups[f"{mlp}.up_proj"]
    assert channels.kind == "channels" and channels.size == 128
    assert channels.members == tuple(sorted(f"{mlp}.{p}_proj" for p in ("gate", "up", "down")))
    # The residual stream is kept; no group roots at q, k or v.
    assert sorted(g.kind for g in groups.values()) == ["channels", "channels", "kv-heads", "kv-heads"]


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "llm-pruner", "movement"])
def test_dropping_a_kv_head_drops_the_query_heads_that_share_it(
    llama: tuple[nn.Module, torch.Tensor, SearchSpace], importance: str
) -> None:
    model, example, space = llama
    attn = ATTN.format(0)
    plan = Plan(channels={f"{attn}.k_proj": 0.5})
    pruned = apply(model, example, space, plan, importance=importance, calibration=_calibration(model))
    layers = dict(pruned.model.named_modules())
    assert layers[f"{attn}.q_proj"].weight.shape == (32, 64)  # 2 of 4 query heads
    assert layers[f"{attn}.k_proj"].weight.shape == (16, 64)  # 1 of 2 kv heads
    assert layers[f"{attn}.v_proj"].weight.shape == (16, 64)
    assert layers[f"{attn}.o_proj"].weight.shape == (64, 32)
    # Which kv head went: the pruned model equals the base with that head's query outputs silenced.
    kept_k = layers[f"{attn}.k_proj"].weight
    base_k = dict(model.named_modules())[f"{attn}.k_proj"].weight
    dropped = 0 if torch.equal(kept_k, base_k[16:]) else 1
    assert torch.equal(kept_k, base_k[16 * (1 - dropped): 16 * (2 - dropped)])
    silenced = copy.deepcopy(model)
    with torch.no_grad():
        dict(silenced.named_modules())[f"{attn}.o_proj"].weight[:, 32 * dropped: 32 * (dropped + 1)] = 0
        ids = token_ids(2, 16, seed=7)
        torch.testing.assert_close(pruned.model(ids), silenced(ids), atol=1e-5, rtol=1e-4)


def test_a_quiet_kv_head_is_the_one_dropped(llama: tuple[nn.Module, torch.Tensor, SearchSpace]) -> None:
    model, example, space = llama
    quiet = copy.deepcopy(model)
    attn = ATTN.format(1)
    layers = dict(quiet.named_modules())
    with torch.no_grad():
        for part, rows in (("q", slice(32, 64)), ("k", slice(16, 32)), ("v", slice(16, 32))):
            layers[f"{attn}.{part}_proj"].weight[rows] *= 0.01
        layers[f"{attn}.o_proj"].weight[:, 32:] *= 0.01
    pruned = apply(quiet, example, space, Plan(channels={f"{attn}.k_proj": 0.5}))
    kept = dict(pruned.model.named_modules())[f"{attn}.k_proj"].weight
    assert torch.equal(kept, layers[f"{attn}.k_proj"].weight[:16])


@TRACED_MASKS
def test_pruned_llama_exports_and_agrees_with_onnx_runtime(
    llama: tuple[nn.Module, torch.Tensor, SearchSpace], tmp_path: Path
) -> None:
    model, example, space = llama
    plan = Plan(channels={g.name: min(g.ratios) for g in space.groups},
                sparsity={s.layer: "2:4" for s in space.sparsity})
    pruned = apply(model, example, space, plan, importance="llm-pruner", nm_criterion="sparsegpt",
                   calibration=_calibration(model))
    for layer in plan.sparsity:
        assert satisfies_nm(dict(pruned.model.named_modules())[layer].weight, 2, 4)
    artifact = export_onnx(pruned.model, example, tmp_path)  # ORT vs torch within 1e-4
    assert artifact.max_abs_diff < 1e-4
    assert pruned.params < space.base_params


@TRACED_MASKS
def test_short_search_over_a_llama(llama: tuple[nn.Module, torch.Tensor, SearchSpace], tmp_path: Path) -> None:
    model, example, space = llama
    calibration = _calibration(model)
    held_out = token_ids(4, 16, seed=11)
    with torch.no_grad():
        dense = model(held_out)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(space.dense_params())
    for _ in range(4):
        trial = study.ask()
        plan = space.suggest(trial)
        pruned = apply(model, example, space, plan, importance="llm-pruner", nm_criterion="wanda",
                       calibration=calibration)
        export_onnx(pruned.model, example, tmp_path)
        with torch.no_grad():
            error = float((pruned.model(held_out) - dense).norm() / dense.norm())
        study.tell(trial, error)
    errors = [t.value for t in study.trials]
    assert errors[0] == 0.0  # the dense plan first
    assert all(e is not None and e > 0 for e in errors[1:])
