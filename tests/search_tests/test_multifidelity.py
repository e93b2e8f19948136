"""Issue 10: the distorted-digits example's data, the sensitivity start, NetAdapt and the final
recovery of the front, on a small plugin model through the CLI and real ONNX Runtime timing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

from search.cli.main import app
from search.examples.distorted_digits import DistortionRecipe, distorted_tensors
from search.storage.record import read_final_scores, read_trials, read_walk
from search.study import sensitivity

runner = CliRunner()

# Wide enough (64 channels at 16x16) that a cut's latency stands well above timer noise.
PLUGIN = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from search.pipeline.bundle import ModelBundle, classification_error

def bundle():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4)).eval()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return ModelBundle(name="wide", model=model, example_input=x[:1], train_loader=loader,
                       val_loader=loader, error_fn=classification_error)
'''


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_profile_path: Path,
          hwprune_cache: Path) -> dict[str, Any]:
    (tmp_path / "wide_plugin.py").write_text(PLUGIN)
    # A short grid keeps the scans short: 3 cuts per group (16, 32, 48 of 64 channels).
    (tmp_path / "grid.yaml").write_text("keep_ratios: [0.25, 0.5, 0.75, 1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return {
        "db": f"sqlite:///{tmp_path}/t.db",
        "env": {"HWPRUNE_CACHE": str(hwprune_cache), "HWPRUNE_HEARTBEAT_S": "1", "HWPRUNE_GRACE_S": "3"},
        "pre": ["--profiles-dir", str(fast_profile_path.parent)],
        "model": ["--model", "wide_plugin:bundle", "-p", "fast", "--recovery-steps", "2",
                  "--config", str(tmp_path / "grid.yaml")],
    }


def _study(db: str, name: str) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=f"hwprune:{name}", storage=db)


def _run(setup: dict[str, Any], args: list[str]) -> Any:
    result = runner.invoke(app, [*setup["pre"], *args], env=setup["env"])
    assert result.exit_code == 0, result.output
    return result


def test_distorted_digits_are_generated_deterministically() -> None:
    recipe = DistortionRecipe(copies=1)
    first, second = distorted_tensors(recipe), distorted_tensors(recipe)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    x_train, y_train, x_val, y_val = first
    assert x_train.shape == (1437, 1, 16, 16) and x_val.shape == (360, 1, 16, 16)
    assert set(y_train.tolist()) == set(range(10)) and y_val.shape == (360,)
    # Distorted: a copy of the same source image is drawn differently each time.
    two = distorted_tensors(DistortionRecipe(copies=2))[0]
    assert two.shape[0] == 2 * 1437 and not torch.equal(two[:1437], two[1437:])


def test_sensitivity_scan_is_stored_shown_and_enqueued(setup: dict[str, Any]) -> None:
    _run(setup, ["search", "start", "--name", "sens", *setup["model"], "--sensitivity-start",
                 "--trials", "10", "--db", setup["db"], "--json"])
    study = _study(setup["db"], "sens")
    scan = sensitivity.stored(study)
    assert scan is not None and scan.has_latency and scan.latency_source in ("measured", "cache+measured")
    groups = {cut.group for cut in scan.cuts}
    assert len(groups) == 3 and len(scan.cuts) == 3 * 3
    # The narrowest cut of a group is faster than its widest cut.
    for group in groups:
        cuts = sorted((c for c in scan.cuts if c.group == group), key=lambda c: c.kept)
        assert cuts[0].latency_ratio is not None and cuts[-1].latency_ratio is not None
        assert cuts[0].latency_ratio < cuts[-1].latency_ratio
    started = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs.get("start")]
    assert len(started) >= 3  # the uniform rungs (0.5 and 0.75 alike round to the grid) and greedy plans
    from wide_plugin import bundle  # type: ignore[import-not-found]

    from hardware_profiles import load_profile_file
    from search.pipeline.space import build_space

    model = bundle()
    profile = load_profile_file(Path(setup["pre"][1]) / "fast.yaml")
    space = build_space(model.model, model.example_input, [profile], keep_ratios=(0.25, 0.5, 0.75, 1.0))
    expected = sensitivity.start_params(space, scan)
    assert [t.params for t in sorted(started, key=lambda t: t.number)] == expected[:len(started)]
    shown = json.loads(_run(setup, ["space", "--sensitivity", "--search", "sens", "--db", setup["db"],
                                    "--json"]).stdout)
    assert shown == scan.to_dict()
    text = _run(setup, ["space", "--sensitivity", "--search", "sens", "--db", setup["db"]]).stdout
    assert "latency on fast from" in text


def test_netadapt_walks_to_lower_latency_and_a_resume_continues_the_walk(setup: dict[str, Any]) -> None:
    _run(setup, ["search", "start", "--name", "na", *setup["model"], "--sampler", "netadapt",
                 "--trials", "5", "--db", setup["db"], "--json"])
    first = read_walk(_study(setup["db"], "na"))
    assert first
    # A resume with a larger budget carries on from the last kept model; it does not start over
    # from the dense model (which repeated the first steps' plans as new trials).
    _run(setup, ["search", "resume", "na", "--trials", "8", "--db", setup["db"], "--json"])
    study = _study(setup["db"], "na")
    walk = read_walk(study)
    assert walk[:len(first)] == first
    assert [step.step for step in walk] == list(range(1, len(walk) + 1))
    assert len(walk) >= 2
    targets = [step.target_ratio for step in walk]
    assert targets == sorted(targets, reverse=True)
    # Each step keeps a model measured faster than the previous step's, up to timing noise.
    ratios = [step.latency_ratio for step in walk]
    assert all(later < earlier + 0.03 for earlier, later in zip(ratios, ratios[1:], strict=False))
    assert ratios[-1] < ratios[0] < 1.0
    trials = read_trials(study, ["COMPLETE"])
    assert len(trials) == 8
    assert all(t.netadapt_step for t in trials[1:])  # every trial but the dense one


def test_final_recovery_is_stored_beside_the_search_error(setup: dict[str, Any], tmp_path: Path) -> None:
    result = _run(setup, ["search", "start", "--name", "fin", *setup["model"], "--final-steps", "6",
                          "--trials", "5", "--db", setup["db"], "--json"])
    rows = json.loads(result.stdout)["pareto"]
    study = _study(setup["db"], "fin")
    assert rows and all(row["final_steps"] == 6 for row in rows)
    finals = read_final_scores(study)
    errors = {t.number: t.error for t in read_trials(study)}
    for row in rows:
        stored = finals[row["trial"]]
        assert stored.search_error == errors[row["trial"]] == row["error"]
        assert row["final_error"] == stored.error
    table = _run(setup, ["pareto", "fin", "--db", setup["db"]]).stdout
    assert "final accuracy (6 steps)" in table
    out = tmp_path / "front"
    _run(setup, ["export", "fin", "--pareto", "--out", str(out), "--db", setup["db"]])
    for row in rows:
        manifest = json.loads((out / f"trial-{row['trial']}" / "manifest.json").read_text())
        assert manifest["final_steps"] == 6 and manifest["search_error"] == row["error"]
        # The export repeats the final recovery: the same seed, so the same error.
        assert manifest["final_error"] == pytest.approx(row["final_error"])


def test_trial_pruning_stops_a_hopeless_trial_before_fine_tuning(setup: dict[str, Any]) -> None:
    _run(setup, ["search", "start", "--name", "tp", *setup["model"], "--trial-pruning", "median",
                 "--trials", "1", "--db", setup["db"], "--json"])
    study = _study(setup["db"], "tp")
    # Five reference trials that scored the best reward there is (0: no error) before fine-tuning,
    # added by hand so that the median pruner's verdict on the next trials is known: any real
    # trial (error above the floor) is below it. They carry no figures, so no front shows them.
    for _ in range(5):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.0, intermediate_values={0: 0.0}))
    _run(setup, ["search", "resume", "tp", "--trials", "8", "--db", setup["db"], "--json"])
    study = _study(setup["db"], "tp")
    stopped = study.get_trials(states=(TrialState.PRUNED,))
    assert len(stopped) == 2 and len(study.trials) == 8  # pruned trials count toward --trials
    for trial in stopped:
        pruned = trial.user_attrs["pruned"]
        assert pruned["stage"] == "before fine-tuning" and 0.0 <= pruned["holdout_error"] <= 1.0
        assert trial.intermediate_values == {0: pruned["reward"]} and pruned["reward"] < 0.0
        # Measured before recovery (real ONNX Runtime timing), stopped before the error on validation.
        assert trial.user_attrs["latency_us"]["fast"] > 1.0
        assert trial.user_attrs["latency"]["fast"]["source"] == "measured"
        stages = trial.user_attrs["stage_s"]
        assert {"export", "measure:fast", "recover"} <= stages.keys() and "evaluate" not in stages
        assert "recovery" not in trial.user_attrs and "error" not in trial.user_attrs
    text = _run(setup, ["search", "status", "tp", "--db", setup["db"]]).stdout
    assert "2 pruned" in text and "asked for 8 completed or pruned" in text
    rows = json.loads(_run(setup, ["search", "trials", "tp", "--db", setup["db"], "--json"]).stdout)
    shown = [row for row in rows if row["state"] == "pruned"]
    assert [row["pruned"] for row in shown] == [t.user_attrs["pruned"] for t in stopped]
    assert all(row["speedup"]["fast"] > 0 for row in shown)
    assert "pruned" in _run(setup, ["search", "trials", "tp", "--db", setup["db"]]).stdout


def test_trial_pruning_measures_first_and_completes_trials_that_are_not_hopeless(
        setup: dict[str, Any], tmp_path: Path) -> None:
    result = _run(setup, ["search", "start", "--name", "tq", *setup["model"], "--trial-pruning", "median",
                          "--trials", "4", "--db", setup["db"], "--json"])
    study = _study(setup["db"], "tq")
    # Fewer completed trials than the pruner's start: every trial runs to the end, measured first.
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 4
    for trial in done[1:]:
        stages = list(trial.user_attrs["stage_s"])
        assert stages.index("measure:fast") < stages.index("recover") < stages.index("evaluate")
        assert trial.intermediate_values[0] <= 0.0 and trial.user_attrs["recovery"]["kept"]
        # The file timed held the weights before recovery; the recovered model's is stored beside
        # it (the same file when recovery kept the raw model).
        assert {"measured_sha256", "artifact_sha256"} <= trial.user_attrs.keys()
    # The export rebuilds each front model and reproduces the recovered file (the fastest trial is
    # always on the front, so at least one pruned model is checked).
    rows = [row for row in json.loads(result.stdout)["pareto"] if row["trial"] != 0]
    assert rows
    out = tmp_path / "front"
    _run(setup, ["export", "tq", "--pareto", "--out", str(out), "--db", setup["db"]])
    for row in rows:
        attrs = study.trials[row["trial"]].user_attrs
        manifest = json.loads((out / f"trial-{row['trial']}" / "manifest.json").read_text())
        assert manifest["onnx_sha256"] == attrs["artifact_sha256"]
        assert manifest["measured_onnx_sha256"] == attrs["measured_sha256"]


@pytest.mark.parametrize(("flags", "reason"), [
    (["--objective", "pareto"], "single-objective"),
    (["--sampler", "netadapt"], "netadapt"),
    (["--recovery-steps", "0"], "steps >= 1"),
    (["--latency", "hybrid"], "latency measured"),
])
def test_trial_pruning_refuses_what_it_cannot_judge(setup: dict[str, Any], flags: list[str], reason: str) -> None:
    result = runner.invoke(app, [*setup["pre"], "search", "start", "--name", "bad", *setup["model"],
                                 "--trial-pruning", "median", *flags, "--db", setup["db"]], env=setup["env"])
    assert result.exit_code == 2, result.output
    assert "trial_pruning median" in result.output and reason in result.output
