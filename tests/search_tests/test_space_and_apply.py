"""The pruning space and plan application on residual, depthwise and attention architectures."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hardware_profiles import HardwareProfile, load_profile
from search.errors import PlanError
from search.pipeline.onnx_export import export_onnx
from search.pipeline.plan import Plan
from search.pipeline.space import SearchSpace, apply, build_space, kept_units
from search.pipeline.sparsity import _runs_view as sparsity_runs
from search.pipeline.sparsity import nm_mask, satisfies_nm

Arch = tuple[str, nn.Module, torch.Tensor]
Factory = Callable[[str, int], tuple[nn.Module, torch.Tensor]]


@pytest.fixture(scope="module")
def cpu() -> HardwareProfile:
    return load_profile("cpu-ort-fp32")


@pytest.fixture(scope="module")
def ampere() -> HardwareProfile:
    return load_profile("ampere-trt-fp16")


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels  # type: ignore[return-value]


def test_kept_units_rounding() -> None:
    assert kept_units(64, 0.5, 16) == 32
    assert kept_units(64, 0.3, 16) == 16  # 19.2 -> nearest multiple 16
    assert kept_units(64, 0.01, 16) == 16  # never below one multiple
    assert kept_units(64, 1.0, 16) == 64
    assert kept_units(24, 0.5, 16) == 16
    assert kept_units(12, 0.5, 16) == 12  # below one multiple: cannot round, stays dense
    assert kept_units(4, 0.01, 1) == 1  # never zero


def test_space_basics(architecture: Arch, cpu: HardwareProfile) -> None:
    name, model, example = architecture
    space = build_space(model, example, [cpu])
    assert space.groups, name
    modules = dict(model.named_modules())
    assert space.output_layer in {"fc", "classifier", "head"}
    assert all(space.output_layer != g.name for g in space.groups)
    for group in space.groups:
        assert group.name in modules
        assert 0 < group.mac_share <= 1
        assert min(group.kept) >= 1 and max(group.kept) == group.size
        if group.kind == "channels":
            assert all(k % 16 == 0 or k == group.size for k in group.kept)
    # CPU runs no N:M faster: nothing offered.
    assert space.sparsity == ()


def test_group_names_stable_across_copies_and_instances(
    architecture: Arch, cpu: HardwareProfile, build_architecture: Factory
) -> None:
    name, model, example = architecture
    first = build_space(model, example, [cpu])
    copied = build_space(copy.deepcopy(model), example, [cpu])
    fresh_model, _ = build_architecture(name, 7)  # other weights, same architecture
    fresh = build_space(fresh_model, example, [cpu])
    assert [g.name for g in first.groups] == [g.name for g in copied.groups] == [g.name for g in fresh.groups]
    assert first.fingerprint() == copied.fingerprint() == fresh.fingerprint()


def test_residual_members_share_one_group(build_architecture: Factory, ampere: HardwareProfile) -> None:
    model, example = build_architecture("resnet18", 0)
    space = build_space(model, example, [ampere])  # multiple 8: the 16-wide stem stays searchable
    owners = [g for g in space.groups if "layer1.0.conv2" in g.members and "layer1.1.conv2" in g.members]
    assert len(owners) == 1, "the residual stream of layer1 must be a single decision"


def test_nm_offered_only_where_a_target_runs_it(
    architecture: Arch, cpu: HardwareProfile, ampere: HardwareProfile
) -> None:
    name, model, example = architecture
    space = build_space(model, example, [cpu, ampere])
    modules = dict(model.named_modules())
    assert space.sparsity, name
    for choice in space.sparsity:
        layer = modules[choice.layer]
        assert choice.patterns == ("2:4",)
        assert not (isinstance(layer, nn.Conv2d) and layer.groups > 1), "depthwise is never N:M"
        assert choice.layer != space.output_layer


def test_transformer_heads_are_decisions(build_architecture: Factory, cpu: HardwareProfile) -> None:
    model, example = build_architecture("transformer", 0)
    space = build_space(model, example, [cpu])
    heads = [g for g in space.groups if g.kind == "heads"]
    assert {g.name for g in heads} == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    assert all(g.kept == (1, 2, 3, 4) and g.unit_width == 16 for g in heads)
    ffn = [g for g in space.groups if g.name.endswith("fc1")]
    assert len(ffn) == 2


def _some_plan(space: SearchSpace, sparse: bool) -> Plan:
    channels = {g.name: g.ratios[len(g.ratios) // 2] for g in space.groups}
    sparsity = {s.layer: s.patterns[0] for s in space.sparsity[::2]} if sparse else {}
    return Plan(channels=channels, sparsity=sparsity)


def test_plan_is_honoured_after_rounding(
    architecture: Arch, cpu: HardwareProfile, ampere: HardwareProfile, tmp_path: Path
) -> None:
    name, model, example = architecture
    space = build_space(model, example, [cpu, ampere])
    plan = _some_plan(space, sparse=True)
    pruned = apply(model, example, space, plan)
    modules = dict(pruned.model.named_modules())
    for group in space.groups:
        expected = kept_units(group.size, plan.channels[group.name], group.multiple)
        assert pruned.kept[group.name] == expected
        root = modules[group.name]
        if group.kind == "heads":
            assert _out_channels(root) == 3 * expected * group.unit_width
        else:
            assert _out_channels(root) == expected
    assert pruned.macs < space.base_macs
    assert pruned.params < space.base_params
    with torch.no_grad():
        assert pruned.model(example).shape == model(example).shape
    # The base model is untouched.
    assert build_space(model, example, [cpu]).base_macs == space.base_macs
    artifact = export_onnx(pruned.model, example, tmp_path)
    assert artifact.max_abs_diff <= 1e-4


def test_apply_is_bit_identical(architecture: Arch, cpu: HardwareProfile, ampere: HardwareProfile) -> None:
    name, model, example = architecture
    space = build_space(model, example, [cpu, ampere])
    plan = _some_plan(space, sparse=True)
    first = apply(model, example, space, plan).model.state_dict()
    second = apply(copy.deepcopy(model), example, space, plan).model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_nm_is_exact(architecture: Arch, cpu: HardwareProfile, ampere: HardwareProfile) -> None:
    name, model, example = architecture
    space = build_space(model, example, [cpu, ampere])
    plan = _some_plan(space, sparse=True)
    pruned = apply(model, example, space, plan)
    modules = dict(pruned.model.named_modules())
    assert pruned.patterns == {k: v for k, v in plan.sparsity.items()}
    for layer in plan.sparsity:
        weight = modules[layer].weight  # type: ignore[union-attr]
        assert satisfies_nm(weight, 2, 4)
        assert pruned.sparsity[layer] == pytest.approx(0.5, abs=0.01)
    assert pruned.signature != apply(model, example, space, Plan(plan.channels)).signature


def test_nm_mask_keeps_largest_in_each_run() -> None:
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, -1.0, 0.2]])
    mask = nm_mask(weight, 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, False, True, False]]
    conv = torch.randn(3, 8, 2, 2)
    conv_mask = nm_mask(conv, 2, 4)
    assert satisfies_nm(conv * conv_mask, 2, 4)
    assert int(conv_mask.sum()) == conv.numel() // 2


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_mask_equals_a_stable_sort_of_each_run_ties_included(n: int, m: int) -> None:
    """The mask counts ranks instead of sorting; stored trials' masks came from a stable
    descending sort, and a replay must keep the same weights, ties (equal magnitudes,
    +0.0 and -0.0) included."""
    generator = torch.Generator().manual_seed(n * 10 + m)
    linear = torch.randn(48, 64, generator=generator).round(decimals=1)  # many equal magnitudes
    linear[0, :16] = 0.5
    linear[1, :16] = torch.tensor([0.0, -0.0] * 8)
    linear[2] = -linear[2].abs()
    conv = torch.randn(8, 16, 3, 3, generator=generator).round(decimals=1)
    for weight in (linear, conv):
        runs = sparsity_runs(weight.abs(), m)
        order = torch.sort(runs, dim=-1, descending=True, stable=True).indices
        expected = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, order[..., :n], True)
        got = sparsity_runs(nm_mask(weight, n, m), m)
        assert torch.equal(got, expected)
        assert int(got.sum()) == weight.numel() // m * n

def test_heads_really_removed(build_architecture: Factory, cpu: HardwareProfile) -> None:
    model, example = build_architecture("transformer", 0)
    space = build_space(model, example, [cpu])
    plan = Plan(channels={"blocks.0.attn.qkv": 0.5, "blocks.1.attn.qkv": 0.25})
    pruned = apply(model, example, space, plan)
    blocks: Any = pruned.model.blocks
    assert [blocks[0].attn.num_heads, blocks[1].attn.num_heads] == [2, 1]
    assert blocks[0].attn.qkv.out_features == 3 * 2 * 16
    assert blocks[0].attn.proj.in_features == 2 * 16


def test_removing_a_head_equals_silencing_it(build_architecture: Factory, cpu: HardwareProfile) -> None:
    """Pruning 3 of 4 heads gives the base model's output with those heads' values zeroed."""
    model, example = build_architecture("transformer", 0)
    space = build_space(model, example, [cpu])
    pruned: Any = apply(model, example, space, Plan(channels={"blocks.1.attn.qkv": 0.25})).model
    base: Any = model
    kept_v = pruned.blocks[1].attn.qkv.weight.detach()[32:48]
    base_qkv = base.blocks[1].attn.qkv
    base_v = base_qkv.weight.detach()[128:192].view(4, 16, -1)
    kept_head = next(h for h in range(4) if torch.equal(base_v[h], kept_v))
    reference: Any = copy.deepcopy(model)
    with torch.no_grad():
        qkv = reference.blocks[1].attn.qkv
        for head in range(4):
            if head != kept_head:
                qkv.weight[128 + 16 * head : 128 + 16 * (head + 1)] = 0
                qkv.bias[128 + 16 * head : 128 + 16 * (head + 1)] = 0
        assert torch.allclose(pruned(example), reference(example), atol=1e-5)
        assert not torch.allclose(model(example), reference(example), atol=1e-5)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "lamp", "bn-scale"])
def test_importance_criteria(build_architecture: Factory, cpu: HardwareProfile, importance: str) -> None:
    model, example = build_architecture("resnet18", 0)
    space = build_space(model, example, [cpu])
    calibration = [(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)),
                    torch.tensor([0, 1, 2, 3])) for i in range(2)]
    plan = space.uniform_plan(0.5)
    pruned = apply(model, example, space, plan, importance=importance, calibration=calibration)
    assert pruned.macs < space.base_macs
    again = apply(model, example, space, plan, importance=importance, calibration=calibration)
    state, state_again = pruned.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)


def test_importance_choice_changes_which_channels(build_architecture: Factory, cpu: HardwareProfile) -> None:
    model, example = build_architecture("resnet18", 0)
    space = build_space(model, example, [cpu])
    plan = space.uniform_plan(0.5)
    magnitude = apply(model, example, space, plan, importance="magnitude").model.state_dict()
    bn = apply(model, example, space, plan, importance="bn-scale").model.state_dict()
    assert any(not torch.equal(magnitude[k], bn[k]) for k in magnitude if k.endswith("weight"))


BAD_PLANS = [
    ({"channels": {"nope.conv": 0.5}}, r"unknown group 'nope.conv'; the space has: "),
    ({"channels": {"{g}": 1.5}}, r"ratio for '.*' must be in \[0.25, 1\], got 1.5"),
    ({"channels": {"{g}": 0.1}}, r"ratio for '.*' must be in \[0.25, 1\], got 0.1"),
    ({"channels": {"{g}": -0.5}}, r"must be in \[0.25, 1\], got -0.5"),
    ({"channels": {"{g}": "half"}}, r"channels for '.*' must be a kept count \(integer\) or .*, got 'half'"),
    ({"channels": {"{g}": True}}, r"must be a kept count \(integer\) or a keep-ratio \(decimal\), got True"),
    ({"channels": {"fc": 0.5}}, r"unknown group 'fc'"),
    ({"sparsity": {"conv1": "2:4"}}, r"unknown N:M-eligible layer 'conv1'"),  # 3 input channels
    ({"sparsity": {"{s}": "1:4"}}, r"sparsity for '.*' must be one of dense, 2:4, got '1:4'"),
    ({"sparsity": {"{s}": 24}}, r"must be a string like '2:4' or 'dense', got 24"),
    ({"layers": {}}, r"unknown key\(s\) layers; allowed: channels, sparsity"),
    ({"channels": [0.5, 0.5]}, r"'channels' and 'sparsity' must be mappings"),
    (["not", "a", "mapping"], r"expected a mapping"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_PLANS)
def test_bad_plans_are_refused(
    build_architecture: Factory, cpu: HardwareProfile, ampere: HardwareProfile, raw: object, message: str
) -> None:
    model, example = build_architecture("resnet18", 0)
    cpu_space = build_space(model, example, [cpu])
    nm_space = build_space(model, example, [cpu, ampere])
    group = cpu_space.groups[0].name
    sparse = nm_space.sparsity[0].layer
    if isinstance(raw, dict):
        raw = {
            key: {k.format(g=group, s=sparse): v for k, v in value.items()} if isinstance(value, dict) else value
            for key, value in raw.items()
        }
    space = nm_space if isinstance(raw, dict) and "sparsity" in raw else cpu_space
    with pytest.raises(PlanError, match=message):
        apply(model, example, space, Plan.from_dict(raw))


def test_nm_on_cpu_only_space_is_refused(build_architecture: Factory, cpu: HardwareProfile) -> None:
    model, example = build_architecture("mobilenetv2", 0)
    space = build_space(model, example, [cpu])
    with pytest.raises(PlanError, match="unknown N:M-eligible layer 'features.0'.*the space has: \\(none\\)"):
        apply(model, example, space, Plan(sparsity={"features.0": "2:4"}))


def test_unknown_ignored_layer(build_architecture: Factory, cpu: HardwareProfile) -> None:
    model, example = build_architecture("resnet18", 0)
    with pytest.raises(PlanError, match="unknown layer\\(s\\) to ignore: layer9"):
        build_space(model, example, [cpu], ignored=["layer9"])


def test_ignored_layer_keeps_its_channels(build_architecture: Factory, cpu: HardwareProfile) -> None:
    model, example = build_architecture("mobilenetv2", 0)
    space = build_space(model, example, [cpu], ignored=["features.0"])
    assert all("features.0" != g.name for g in space.groups)
    assert "features.0" in space.ignored


def test_plan_file_round_trip(tmp_path: Path) -> None:
    plan = Plan(channels={"a": 0.5}, sparsity={"b": "2:4", "c": "dense"})
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"plan{suffix}"
        plan.dump(path)
        loaded = Plan.load(path)
        assert loaded.to_dict() == plan.to_dict()
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path / "missing.yaml")
