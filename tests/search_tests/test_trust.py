"""Figures a user can trust: the reward's floor and budget mode, confirmation of front figures,
and a base model whose error is 0 not winning by definition."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from search.cli.main import app
from search.study.confirmation import Session, conclude, needs_another, overlap
from search.study.reward import reward

REWARD_PAGE = Path(__file__).resolve().parents[2] / "docs" / "concepts" / "reward.md"  # the worked example
runner = CliRunner()


def test_reward_example_in_the_docs_is_what_the_code_computes() -> None:
    text = REWARD_PAGE.read_text()
    block = text.split("<!-- reward-example:start -->")[1].split("<!-- reward-example:end -->")[0]
    rows = [line.strip().strip("|").split("|") for line in block.strip().splitlines()[2:]]
    assert [row[0].strip() for row in rows] == ["base", "A", "B", "C"]
    base_error = float(rows[0][1])
    floor = base_error + 0.01
    assert f"reward, default floor {floor:.3f}" in block
    scores = {}
    for name, error, latency, plain, floored in ([cell.strip() for cell in row] for row in rows):
        assert reward(float(error), float(latency)) == pytest.approx(float(plain), abs=5e-5)
        scores[name] = reward(float(error), float(latency), error_floor=floor)
        assert scores[name] == pytest.approx(float(floored), abs=5e-5)
    plain_best = max(rows, key=lambda row: float(row[3]))[0].strip()
    assert plain_best == "base" and max(scores, key=scores.__getitem__) == "B"
    # The budget example: only C is within 0.3 x the base latency, and the reward is -error.
    assert reward(0.060, 250.0, resource_constrained=True) == -0.060
    assert "only C (0.25x) is feasible, and it wins with reward -0.060" in " ".join(text.split())


def test_budget_mode_ranks_by_error_alone() -> None:
    fast_worse = reward(0.05, 100.0, error_floor=0.03, resource_constrained=True)
    slow_better = reward(0.04, 900.0, error_floor=0.03, resource_constrained=True)
    assert slow_better > fast_worse


def test_two_agreeing_sessions_stand_conservatively() -> None:
    first, second = Session(0.50, (0.49, 0.51)), Session(0.505, (0.50, 0.515))
    assert overlap(first, second) and not needs_another([first, second]) and needs_another([first])
    verdict = conclude([first, second])
    assert verdict.ratio == 0.505  # the slower of the two
    low, high = verdict.interval
    # Both intervals, widened by at least 2% of the ratio for the drift between sessions.
    assert low == pytest.approx(0.49 - 0.0101) and high == pytest.approx(0.515 + 0.0101)


def test_disagreeing_sessions_take_a_third_and_drop_the_outlier() -> None:
    lucky, real = Session(0.212, (0.206, 0.233)), Session(0.31, (0.305, 0.317))
    assert needs_another([lucky, real])
    verdict = conclude([lucky, real, Session(0.308, (0.30, 0.315))])
    assert verdict.ratio == 0.31  # the slower of the pair that agrees; the lucky session is out
    spread = 0.31 - 0.212
    assert verdict.interval == pytest.approx((0.206 - spread, 0.317 + spread))


# --- searches ------------------------------------------------------------------------------------

# A model where pruning is nearly free: half the channels of each conv carry almost nothing, so
# magnitude pruning removes them with a fidelity error far below one point.
NEARLY_FREE_PLUGIN = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search.pipeline.bundle import ModelBundle, fidelity_error


def bundle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight[32:] *= 1e-4
            conv.bias[32:] = 0
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(32, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return ModelBundle(name="nearly-free", model=model, example_input=x[:1], train_loader=loader,
                       val_loader=loader, error_fn=fidelity_error(model))
'''


@pytest.fixture
def nearly_free_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"nearly_free_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(NEARLY_FREE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _study(url: str, name: str) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=f"hwprune:{name}", storage=url)


def _search(plugin: str, url: str, name: str, env: dict[str, str], *extra: str) -> Any:
    return runner.invoke(app, ["search", "start", "--name", name, "--model", f"{plugin}:bundle", "--trials", "6",
                               "--sampler", "random", "--recovery-steps", "0", "--db", url, "--json", *extra],
                         env=env)


def test_zero_base_error_with_the_default_floor_prunes(
    tmp_path: Path, hwprune_cache: Path, nearly_free_plugin: str
) -> None:
    env = {"HWPRUNE_CACHE": str(hwprune_cache)}
    url = f"sqlite:///{tmp_path / 'z.db'}"
    result = _search(nearly_free_plugin, url, "z", env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    info = report["search"]
    assert info["base_error"] == pytest.approx(0.0, abs=1e-9) and info["error_floor"] == pytest.approx(0.01)
    study = _study(url, "z")
    best = study.trials[info["best_trial"]]
    assert best.user_attrs["signature"] != study.trials[0].user_attrs["signature"]  # not the base
    assert best.user_attrs["latency"]["cpu-ort-fp32"]["ratio"] < 1.0
    assert report["warnings"] == []

    # With a floor of 0 the dense model scores 0, the best reward there is: the search says so.
    plain = _search(nearly_free_plugin, url, "plain", env, "--error-floor", "0")
    assert plain.exit_code == 0, plain.output
    plain_report = json.loads(plain.stdout)
    assert plain_report["search"]["best_is_base"] is True
    assert "--error-floor" in plain_report["warnings"][0]
    assert "--latency-budget-ratio" in plain_report["warnings"][0]


def test_status_shows_failures_by_stage(tmp_path: Path, hwprune_cache: Path, nearly_free_plugin: str) -> None:
    import importlib

    module = importlib.import_module(nearly_free_plugin)
    real_bundle = module.bundle

    def bundle_with_a_bad_scorer() -> Any:
        bundle = real_bundle()
        calls = {"n": 0}
        scorer = bundle.error_fn

        def error_fn(model: Any, batches: Any) -> float:
            calls["n"] += 1
            if calls["n"] % 2 == 0:  # every other evaluation: a bug in the user's code
                raise KeyError("label column")
            return float(scorer(model, batches))

        from dataclasses import replace

        return replace(bundle, error_fn=error_fn)

    module.__dict__["bundle"] = bundle_with_a_bad_scorer
    env = {"HWPRUNE_CACHE": str(hwprune_cache)}
    url = f"sqlite:///{tmp_path / 'f.db'}"
    result = _search(nearly_free_plugin, url, "f", env)
    assert result.exit_code == 0, result.output
    study = _study(url, "f")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    status = json.loads(runner.invoke(app, ["search", "status", "f", "--db", url, "--json"], env=env).stdout)
    assert status["failures_by_stage"]["evaluate"]["count"] == len(failed)
    assert status["failures_by_stage"]["evaluate"]["first_reason"] == "KeyError: 'label column'"
    text = runner.invoke(app, ["search", "status", "f", "--db", url], env=env).stdout
    assert re.search(rf"failed at evaluate: {len(failed)} \(first: trial \d+, KeyError: 'label column'\)", text)
    assert math.isfinite(status["stage_median_s"]["evaluate"])


def _record(**constraints: float) -> Any:
    import datetime as dt

    from search.config import SearchConfig
    from search.storage import SearchRecord
    from search.storage.record import BaseFigures

    return SearchRecord(
        name="s", study_name="hwprune:s",
        config=SearchConfig(name="s", example="digits", targets=["cpu"], constraints=constraints),  # type: ignore[arg-type]
        base_fingerprint="", space_fingerprint="", space={},
        base=BaseFigures(error=0.05, macs=0, params=0, signature="base", artifact_sha256="", error_floor=0.06,
                         measurements={"cpu": {"median_us": 1000.0}}),
        versions={}, created_at=dt.datetime(2026, 1, 1))


def _trial(study: optuna.Study, signature: str, error: float, ratio: float, ci: tuple[float, float]) -> None:
    from optuna.distributions import FloatDistribution

    study.add_trial(optuna.create_trial(
        value=0.0, params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"error": error, "signature": signature, "latency_us": {"cpu": ratio * 1000},
                    "latency": {"cpu": {"ratio": ratio, "ratio_ci": list(ci)}}}))


def test_an_unconfirmed_lucky_figure_never_hides_a_confirmed_trial() -> None:
    from search.storage.record import Confirmation, write_confirmation
    from search.study.read import pareto_rows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(direction="maximize")
    _trial(study, "base", 0.05, 1.0, (1.0, 1.0))
    _trial(study, "a", 0.06, 0.5, (0.49, 0.51))
    _trial(study, "lucky", 0.06, 0.3, (0.28, 0.33))  # would dominate "a" on its one session
    write_confirmation(study, "cpu", "a", Confirmation((Session(0.5, (0.49, 0.51)), Session(0.51, (0.5, 0.52))),
                                                       0.51, (0.47, 0.54)))
    rows = {row.trial: row.to_dict() for row in pareto_rows(_record(), study, "cpu")}
    assert set(rows) == {0, 1, 2}
    assert rows[1]["confirmed"] == {"cpu": True} and rows[1]["ratio"] == {"cpu": 0.51}
    assert rows[2]["confirmed"] == {"cpu": False}
    assert rows[1]["speedup_interval"]["cpu"] == pytest.approx([1 / 0.54, 1 / 0.47])
    # Confirmed slower than "a": now "a" dominates it and it leaves the front.
    write_confirmation(study, "cpu", "lucky", Confirmation((Session(0.3, (0.28, 0.33)), Session(0.6, (0.58, 0.62)),
                                                            Session(0.61, (0.6, 0.62))), 0.61, (0.0, 0.9)))
    assert [row.trial for row in pareto_rows(_record(), study, "cpu")] == [1, 0]
    # A latency budget is judged on the confirmed figure: 0.51 is within 0.52 but over 0.505,
    # although its first session (0.50) was within both.
    assert [row.trial for row in pareto_rows(_record(latency_budget_ratio=0.52), study, "cpu")] == [1]
    assert pareto_rows(_record(latency_budget_ratio=0.505), study, "cpu") == []
