"""N:M criteria (magnitude, Wanda, SparseGPT), gradient importances, and the criterion on replay."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hardware_profiles import load_profile
from search.config import load_search_config
from search.errors import ConfigError, PlanError, SearchError
from search.examples.zoo import make_architecture
from search.pipeline.bundle import ModelBundle, classification_error
from search.pipeline.inputs import tensors
from search.pipeline.onnx_export import export_onnx
from search.pipeline.plan import Plan
from search.pipeline.pruning import calibration_batches
from search.pipeline.space import apply, build_space
from search.pipeline.sparsity import nm_mask, satisfies_nm, sparsify
from search.study.materialize import rebuild_trial


def _output_error(dense: nn.Module, sparse: nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sparse(inputs) - dense(inputs)).norm() / dense(inputs).norm())


def _correlated_inputs(count: int, features: int, seed: int) -> torch.Tensor:
    # Inputs with a few loud features and correlated columns, as LLM activations have.
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, features, generator=generator)
    mixed = base @ (torch.eye(features) + 0.5 * torch.randn(features, features, generator=generator))
    mixed[:, :: features // 4] *= 20.0
    return mixed


def _smooth_maps(count: int, seed: int) -> torch.Tensor:
    # Smooth, channel-correlated feature maps, as a convolution inside a network sees them.
    generator = torch.Generator().manual_seed(seed)
    mix = torch.eye(16) + 0.5 * torch.randn(16, 16, generator=torch.Generator().manual_seed(99))
    noise = torch.randn(count, 16, 4, 4, generator=generator)
    maps = nn.functional.interpolate(noise, size=(8, 8), mode="bilinear", align_corners=False)
    return torch.einsum("dc,nchw->ndhw", mix, maps)


def test_wanda_keeps_weights_on_loud_inputs_that_magnitude_drops() -> None:
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.9, 0.1, 0.2]]))
    inputs = torch.ones(8, 4)
    inputs[:, 2] = 100.0  # |0.1| * 100 beats |0.9| * 1
    model = nn.Sequential(layer)
    masks = sparsify(model, {"0": (2, 4)}, criterion="wanda", calibration=[inputs])
    assert masks["0"].tolist() == [[True, False, True, False]]
    assert nm_mask(torch.tensor([[1.0, 0.9, 0.1, 0.2]]), 2, 4).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sparsegpt_updates_kept_weights_and_beats_magnitude_and_wanda(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        dense = nn.Sequential(nn.Linear(32, 16))
        calibration = [_correlated_inputs(256, 32, seed) for seed in (1, 2)]
        held_out = _correlated_inputs(256, 32, 3)
    else:
        dense = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1))
        calibration = [_smooth_maps(16, seed) for seed in range(4)]
        held_out = _smooth_maps(8, 9)
    errors = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        masks = sparsify(model, {"0": (2, 4)}, criterion=criterion, calibration=calibration)
        layer = model[0]
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        weight = layer.weight
        assert satisfies_nm(weight, 2, 4)
        assert torch.equal(weight != 0, masks["0"])
        errors[criterion] = _output_error(dense, model, held_out)
        if criterion == "sparsegpt":
            kept = masks["0"]
            original = dense[0]
            assert isinstance(original, nn.Linear | nn.Conv2d)
            assert not torch.allclose(weight[kept], original.weight[kept])  # kept weights were updated
    assert errors["wanda"] <= errors["magnitude"] * 1.01
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"]


def test_data_aware_criteria_need_calibration() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(PlanError, match="needs calibration batches"):
        sparsify(model, {"0": (2, 4)}, criterion="sparsegpt")
    with pytest.raises(PlanError, match="choose one of: magnitude, wanda, sparsegpt"):
        sparsify(model, {"0": (2, 4)}, criterion="obs")


def _tiny_bundle() -> ModelBundle:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(96, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (96,), generator=generator)
    train = DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(5))
    return ModelBundle(name="tiny", model=model, example_input=images[:1].clone(), train_loader=train,
                       val_loader=DataLoader(TensorDataset(images, labels), batch_size=32),
                       error_fn=classification_error)


def test_calibration_is_the_same_draw_and_leaves_the_loader_alone() -> None:
    bundle = _tiny_bundle()
    generator = bundle.train_loader.generator  # type: ignore[attr-defined]
    before = generator.get_state()
    first = calibration_batches(bundle.train_loader, 3)
    second = calibration_batches(bundle.train_loader, 3)
    assert all(torch.equal(tensors(a[0])[0], tensors(b[0])[0]) for a, b in zip(first, second, strict=True))
    assert torch.equal(generator.get_state(), before)


@pytest.mark.parametrize("importance", ["llm-pruner", "movement"])
def test_gradient_importances_prune_channel_groups(importance: str) -> None:
    bundle = _tiny_bundle()
    space = build_space(bundle.model, bundle.example_input, [load_profile("ampere-trt-fp16")])
    plan = space.uniform_plan(0.5)
    first = apply(bundle.model, bundle.example_input, space, plan, importance=importance,
                  calibration=bundle.train_loader)
    again = apply(bundle.model, bundle.example_input, space, plan, importance=importance,
                  calibration=bundle.train_loader)
    assert first.kept == {g.name: 8 for g in space.groups}
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    magnitude = apply(bundle.model, bundle.example_input, space, plan, calibration=bundle.train_loader)
    assert any(not torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                     magnitude.model.state_dict().values(), strict=True))


def test_nm_criterion_is_a_search_setting() -> None:
    config = load_search_config(None, {"name": "s", "example": "digits", "nm_criterion": "wanda"})
    assert config.nm_criterion == "wanda"
    assert load_search_config(None, {"name": "s", "example": "digits"}).nm_criterion == "magnitude"
    with pytest.raises(ConfigError, match="nm_criterion"):
        load_search_config(None, {"name": "s", "example": "digits", "nm_criterion": "obs"})


def test_rematerialisation_uses_the_stored_criterion(tmp_path: Path) -> None:
    bundle = _tiny_bundle()
    space = build_space(bundle.model, bundle.example_input, [load_profile("ampere-trt-fp16")])
    plan = Plan(sparsity={s.layer: "2:4" for s in space.sparsity})
    assert plan.sparsity
    trial = apply(bundle.model, bundle.example_input, space, plan, nm_criterion="sparsegpt",
                  calibration=bundle.train_loader)
    measured = export_onnx(trial.model, bundle.example_input, tmp_path / "trial")
    base = {"name": "s", "model": "x.y:z", "recovery": {"steps": 0, "bn_batches": 0, "holdout_batches": 0}}
    config = load_search_config(None, {**base, "nm_criterion": "sparsegpt"})
    result = rebuild_trial(bundle=bundle, space=space, config=config, plan=plan.to_dict(),
                           artifact_sha256=measured.sha256,
                           base_signature="dense", artifact_dir=tmp_path / "a", batch_size=1)
    rebuilt, artifact = result.pruned, result.artifact
    assert artifact.sha256 == measured.sha256
    assert all(satisfies_nm(dict(rebuilt.model.named_modules())[layer].weight, 2, 4) for layer in plan.sparsity)
    with pytest.raises(SearchError, match="differs from the measured one"):
        rebuild_trial(bundle=bundle, space=space, config=load_search_config(None, base),
                      plan=plan.to_dict(), artifact_sha256=measured.sha256,
                      base_signature="dense", artifact_dir=tmp_path / "b", batch_size=1)


def test_zoo_transformer_takes_every_criterion() -> None:
    model, example = make_architecture("transformer")
    space = build_space(model, example, [load_profile("ampere-trt-fp16")])
    plan = Plan(sparsity={s.layer: "2:4" for s in space.sparsity})
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, 16, generator=generator), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    held_out = torch.randn(32, 8, 16, generator=generator)
    errors = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        pruned = apply(model, example, space, plan, nm_criterion=criterion, calibration=batches)
        errors[criterion] = _output_error(model, pruned.model, held_out)
    assert errors["sparsegpt"] < errors["magnitude"]


def test_search_start_refuses_an_unknown_nm_criterion(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from search.cli.main import app

    result = CliRunner().invoke(app, ["search", "start", "--name", "s", "--example", "digits",
                                      "--nm-criterion", "obs", "--db", f"sqlite:///{tmp_path}/h.db"])
    assert result.exit_code == 2
    assert "nm_criterion" in result.output and "sparsegpt" in result.output


def test_wanda_on_a_batchnorm_model_reads_the_dense_models_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1)).eval()
    calibration = [torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    layers = {"0": (2, 4), "3": (2, 4), "6": (2, 4)}
    together = sparsify(copy.deepcopy(model), layers, criterion="wanda", calibration=calibration)
    for name, pattern in layers.items():
        alone = sparsify(copy.deepcopy(model), {name: pattern}, criterion="wanda", calibration=calibration)
        assert torch.equal(together[name], alone[name]), name
    # Without BatchNorm the criterion stays sequential, as in Wanda's paper: later layers see the
    # earlier layers' sparse outputs, so some mask differs from the one taken on dense inputs.
    plain = nn.Sequential(*(m for m in model if not isinstance(m, nn.BatchNorm2d))).eval()
    plain_layers = {"0": (2, 4), "2": (2, 4), "4": (2, 4)}
    sequential = sparsify(copy.deepcopy(plain), plain_layers, criterion="wanda", calibration=calibration)
    alone_last = sparsify(copy.deepcopy(plain), {"4": (2, 4)}, criterion="wanda", calibration=calibration)
    assert not torch.equal(sequential["4"], alone_last["4"])


def test_movement_scores_accumulate_while_the_weights_move() -> None:
    from search.pipeline.pruning import _accumulate_movement

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    layer = model[0]
    assert isinstance(layer, nn.Linear)
    weight = layer.weight

    def score() -> torch.Tensor:
        assert weight.grad is not None
        return weight.grad.clone()

    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(8, 6, generator=torch.Generator().manual_seed(i)), torch.tensor([i % 3] * 8))
               for i in range(3)]
    loss_fn = nn.functional.cross_entropy
    _accumulate_movement(model, batches[:1], loss_fn)
    first = score()
    model.zero_grad(set_to_none=True)
    loss_fn(model(batches[0][0]), batches[0][1]).backward()  # type: ignore[no-untyped-call]
    # One batch: the score is -W * dL/dW at the base weights.
    assert torch.allclose(first, -weight.detach() * score())
    model.zero_grad(set_to_none=True)
    _accumulate_movement(model, batches, loss_fn)
    moving = score()
    model.zero_grad(set_to_none=True)
    fixed = torch.zeros_like(moving)
    for inputs, targets in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()  # type: ignore[no-untyped-call]
        fixed -= weight.detach() * score()
    # Three batches: the weights moved between them, so the score is not the one at fixed weights.
    assert not torch.allclose(moving, fixed)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"scoring changed {name}"
