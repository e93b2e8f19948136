"""The Python API: the README's example runs as written; an export reloads in one call, and a
mismatch is a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import search
import search.api as hw
from search.errors import ConfigError, SearchNotFoundError

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def cached(hwprune_cache: Path, digits_bundle: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    # The example uses the digits model, trained once per test session (``digits_bundle``).
    monkeypatch.setenv("HWPRUNE_CACHE", str(hwprune_cache))
    monkeypatch.delenv("HWPRUNE_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_example_runs(cached: Path) -> None:
    text = README.read_text()
    block = re.search(r"<!-- api-example:start -->\n```python\n(.*?)```\n<!-- api-example:end -->", text, re.S)
    assert block is not None, "the README lost its API example"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102
    assert isinstance(namespace["model"], torch.nn.Module)
    assert namespace["result"].summary.completed == 3
    assert [row["trial"] for row in namespace["exported"]] == [row.trial for row in namespace["front"]]
    assert isinstance(namespace["best"], torch.nn.Module)
    assert (cached / "models" / "by-hand" / "model.pt2").is_file()


# A small BatchNorm CNN plugin (32 channels: several kept-channel options on the fast profile).
PLUGIN = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from search.pipeline.bundle import ModelBundle, classification_error

def bundle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 4)).eval()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return ModelBundle(name="small", model=model, example_input=x[:1], train_loader=loader,
                       val_loader=loader, error_fn=classification_error)
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"small_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))
    return f"{name}:bundle"


def test_load_reproduces_the_exported_model(plugin: str, fast_profile: Any, tmp_path: Path) -> None:
    out = tmp_path / "half"
    manifest = hw.export_plan(plugin, {"channels": {"0": 16}}, out, targets=[fast_profile], finetune_steps=3)
    assert manifest["model_spec"] == plugin and manifest["kept"]["0"] == 16
    assert manifest["finetune_steps"] == 3 and manifest["recovery"][0]["steps"] == 3
    assert manifest["self_contained"] == "model.pt2"
    model = search.load(out)
    assert model[0].out_channels == 16
    inputs = torch.randn(5, 3, 8, 8)
    program = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(program(inputs), model(inputs), atol=1e-5)  # at batch 5, not 1
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["7.weight"], state["7.weight"])  # the stored weights, not fresh ones


def test_export_plan_with_mean_compensation(plugin: str, fast_profile: Any, tmp_path: Path) -> None:
    plain = hw.export_plan(plugin, {"channels": {"0": 16}}, tmp_path / "plain", targets=[fast_profile])
    mean = hw.export_plan(plugin, {"channels": {"0": 16}}, tmp_path / "mean", targets=[fast_profile],
                          compensation="mean")
    assert (plain["compensation"], mean["compensation"]) == ("none", "mean")
    assert plain["signature"] == mean["signature"]  # the same architecture, other values
    stored = torch.load(tmp_path / "mean" / "model.pt", weights_only=True)["state_dict"]
    # The removed channels' mean output went into the bias of the convolution they fed.
    assert not torch.equal(torch.load(tmp_path / "plain" / "model.pt", weights_only=True)["state_dict"]["3.bias"],
                           stored["3.bias"])
    assert torch.equal(search.load(tmp_path / "mean").state_dict()["3.bias"], stored["3.bias"])


def test_mismatches_are_clear_errors(plugin: str, fast_profile: Any, tmp_path: Path) -> None:
    from search.study.materialize import load_pruned

    out = tmp_path / "x"
    hw.export_plan(plugin, {"channels": {"0": 0.75}}, out, targets=[fast_profile])
    # The case: a space rebuilt with another profile (channels rounded to 16, not 8).
    other = hw.build_space(plugin, ["cpu-ort-fp32"])
    with pytest.raises(ConfigError, match=r"does not fit the model rebuilt from its plan \(shapes differ: "):
        load_pruned(out / "model.pt", hw.load_model(plugin), other)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["kept"]["0"] = 8
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"does not fit the model rebuilt from its plan \(shapes differ: "):
        search.load(out)
    manifest.pop("model_spec")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="names no model_spec"):
        search.load(out)
    with pytest.raises(ConfigError, match="is not an hwprune export"):
        search.load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is not empty; give an empty or new folder, or --force"):
        hw.export_plan(plugin, {}, out, targets=[fast_profile])


def test_plans_take_counts_or_ratios(plugin: str, fast_profile: Any) -> None:
    from search.errors import PlanError
    from search.pipeline.plan import Plan

    space = hw.build_space(plugin, [fast_profile])
    group = space.group("0")
    assert group.kept == (8, 16, 24, 32)
    assert space.kept(space.resolve(Plan(channels={"0": 24})))["0"] == 24
    assert space.kept(space.resolve(Plan(channels={"0": 0.5})))["0"] == 16
    with pytest.raises(PlanError, match=r"kept channels for '0' must be one of 8, 16, 24, 32, got 12"):
        space.resolve(Plan(channels={"0": 12}))
    # The template is a valid plan: every group at full width, every option in a comment.
    import yaml

    text = space.template("test")
    assert "# options, count (share of 32): 8 (0.25), 16 (0.5), 24 (0.75), 32 (1)" in text
    plan = Plan.from_dict(yaml.safe_load(text))
    assert space.kept(space.resolve(plan)) == {"0": 32, "3": 32}


def test_run_search_confirms_recovers_and_warns_as_the_cli_does(plugin: str, fast_profile_path: Path,
                                                                 tmp_path: Path) -> None:
    settings = hw.Settings(db=f"sqlite:///{tmp_path / 'a.db'}", profiles_dirs=(fast_profile_path.parent,),
                           cache=tmp_path / "cache")
    seen: list[Any] = []
    confirmed: list[tuple[int, str]] = []
    result = hw.run_search({"name": "a", "model": plugin, "targets": ["fast"], "trials": 4, "final_steps": 3,
                            "recovery": {"steps": 2}}, settings=settings, on_trial=seen.append,
                           on_confirmed=lambda trial, target, _verdict: confirmed.append((trial, target)))
    assert result.summary.completed == 4
    assert [p.counted for p in seen] == [1, 2, 3, 4] and all(p.asked == 4 for p in seen)
    # The front is confirmed and finally recovered, as `search start` does it.
    assert result.pareto and all(row.confirmed["fast"] and row.final_steps == 3 for row in result.pareto)
    assert {trial for trial, _ in confirmed} <= {row.trial for row in result.pareto if row.trial != 0}
    # The end-of-search warning is given exactly when the dense base model wins.
    assert bool(result.warnings) == result.summary.best_is_base
    assert result.to_dict()["search"] == hw.status("a", settings=settings).to_dict()
    assert result.to_dict()["pareto"] == [row.to_dict() for row in hw.pareto("a", settings=settings)]
    resumed = hw.resume_search("a", trials=5, settings=settings)
    assert resumed.summary.completed == 5 and resumed.summary.trials_asked == 5
    assert all(row.final_steps == 3 for row in resumed.pareto)


def test_resume_search_of_an_unknown_search_names_the_stored_ones(plugin: str, fast_profile_path: Path,
                                                                  tmp_path: Path) -> None:
    settings = hw.Settings(db=f"sqlite:///{tmp_path / 'a.db'}", profiles_dirs=(fast_profile_path.parent,),
                           cache=tmp_path / "cache")
    hw.run_search({"name": "kept", "model": plugin, "targets": ["fast"], "trials": 2, "recovery": {"steps": 0}},
                  settings=settings)
    with pytest.raises(SearchNotFoundError, match="no search named 'nope'.*searches: kept"):
        hw.resume_search("nope", trials=3, settings=settings)
