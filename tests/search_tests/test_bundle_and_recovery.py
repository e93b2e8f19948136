from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from hardware_profiles import load_profile
from search.config import RecoverySettings
from search.errors import ModelLoadError
from search.examples import load_bundle
from search.pipeline.bundle import ModelBundle
from search.pipeline.onnx_export import export_onnx
from search.pipeline.recovery import recover
from search.pipeline.space import apply, build_space
from search.study.materialize import load_pruned, write_model_dir


def test_digits_example_is_trained_and_cached(digits_bundle: ModelBundle, hwprune_cache: Path) -> None:
    error = digits_bundle.error_fn(digits_bundle.model, digits_bundle.val_loader)
    assert error < 0.05
    cached = list((hwprune_cache / "examples").glob("digits-*.pt"))
    assert len(cached) == 1
    again = load_bundle("digits", cache_dir=hwprune_cache)  # from the cache: same weights
    assert again.fingerprint() == digits_bundle.fingerprint()


def test_unknown_example() -> None:
    with pytest.raises(ModelLoadError, match="no built-in example 'mnist9'; known: digits"):
        load_bundle("mnist9", cache_dir=Path("/nonexistent"))


def test_plugin_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myplugin.py").write_text(textwrap.dedent("""
        def not_a_bundle():
            return 42
        value = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="cannot import model plugin module 'nosuchmod'"):
        load_bundle("nosuchmod:make", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="myplugin has no function 'missing'"):
        load_bundle("myplugin:missing", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="myplugin has no function 'value'"):
        load_bundle("myplugin:value", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="returned int; it must return search.pipeline.bundle.ModelBundle"):
        load_bundle("myplugin:not_a_bundle", cache_dir=tmp_path)
    sys.modules.pop("myplugin", None)


def test_recovery_restores_accuracy_and_keeps_nm(digits_bundle: ModelBundle) -> None:
    bundle = digits_bundle
    space = build_space(bundle.model, bundle.example_input, [load_profile("ampere-trt-fp16")])
    plan = space.uniform_plan(0.25)
    sparse = {s.layer: "2:4" for s in space.sparsity[:2]}
    plan = type(plan)(channels=plan.channels, sparsity=sparse)
    pruned = apply(bundle.model, bundle.example_input, space, plan)
    before = bundle.error_fn(pruned.model, bundle.val_loader)
    recover(pruned.model, bundle, RecoverySettings(steps=60, lr=0.02, optimizer="sgd", warmup=0,
                                                   distill=0.5, bn_batches=4, holdout_batches=2), masks=pruned.masks)
    after = bundle.error_fn(pruned.model, bundle.val_loader)
    assert after < before
    modules = dict(pruned.model.named_modules())
    from search.pipeline.sparsity import satisfies_nm

    assert all(satisfies_nm(modules[name].weight, 2, 4) for name in sparse)  # type: ignore[arg-type]


def test_materialised_state_reloads(digits_bundle: ModelBundle, tmp_path: Path) -> None:
    import torch

    bundle = digits_bundle
    space = build_space(bundle.model, bundle.example_input, [load_profile("cpu-ort-fp32")])
    pruned = apply(bundle.model, bundle.example_input, space, space.uniform_plan(0.5))
    recover(pruned.model, bundle, RecoverySettings(steps=5, bn_batches=0, holdout_batches=0))
    artifact = export_onnx(pruned.model, bundle.example_input, tmp_path / "a")
    out = write_model_dir(tmp_path / "m", bundle=bundle, plan=space.uniform_plan(0.5), pruned=pruned,
                          artifact=artifact, importance="magnitude", model_spec="digits")
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt", "model.pt2", "plan.yaml", "manifest.json"}
    reloaded = load_pruned(out / "model.pt", bundle, space)
    with torch.no_grad():
        assert torch.equal(reloaded(bundle.example_input), pruned.model(bundle.example_input))


