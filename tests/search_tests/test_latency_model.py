"""Latency models on the search side: features of real pruned models, the versioned store, the
hybrid search (no prediction ever on a front) and the commands' exit codes."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from hardware_profiles import load_profile
from latency_models.predictors import LearnedModel
from search.cli.main import app
from search.pipeline.features import architecture_features
from search.pipeline.space import apply, build_space
from search.storage import Repository
from search.storage.predictor_store import LatencyModelStore
from search.study import screening
from search.study.pareto import pareto_front
from search.study.read import trial_points

runner = CliRunner()


@pytest.fixture
def env(hwprune_cache: Path, digits_bundle: Any) -> dict[str, str]:
    return {"HWPRUNE_CACHE": str(hwprune_cache), "HWPRUNE_HEARTBEAT_S": "1", "HWPRUNE_GRACE_S": "3"}


def test_features_follow_the_plan(digits_bundle: Any) -> None:
    profile = load_profile("cpu-ort-fp32")
    space = build_space(digits_bundle.model, digits_bundle.example_input, [profile])
    base = architecture_features(digits_bundle.model, digits_bundle.example_input)
    plan = space.random_plan(random.Random(1))
    pruned = apply(digits_bundle.model, digits_bundle.example_input, space, plan)
    features = architecture_features(pruned.model, digits_bundle.example_input, pruned.patterns)
    assert [layer.name for layer in features.layers] == [layer.name for layer in base.layers]
    widths = space.layer_widths()
    kept = space.kept(plan)
    for group in space.groups:
        for layer in features.layers:
            if layer.name in widths and layer.name in group.members and kept[group.name] in widths[layer.name][1]:
                assert layer.out_channels in widths[layer.name][1]
    assert features.macs == pruned.macs or features.macs <= base.macs
    assert features.macs < base.macs or plan.channels == {}


def test_store_keeps_versions_and_round_trips(db_url: str, digits_bundle: Any) -> None:
    base = architecture_features(digits_bundle.model, digits_bundle.example_input)
    repo = Repository(db_url)
    try:
        store = LatencyModelStore(repo.engine)
        model = LearnedModel(base)
        first = store.save("m", model, profile="cpu-ort-fp32", profile_fingerprint="f" * 16, base_fingerprint="b")
        second = store.save("m", model, profile="cpu-ort-fp32", profile_fingerprint="f" * 16, base_fingerprint="b")
        assert (first.version, second.version) == (1, 2)
        latest = store.get("m", profile="cpu-ort-fp32")
        assert latest.version == 2 and latest.model().to_state() == model.to_state()
        assert [s.name for s in store.for_target(profile_fingerprint="f" * 16, base_fingerprint="b")] == ["m"]
        with pytest.raises(Exception, match="no latency model named 'other'; latency models: m"):
            store.get("other")
        with pytest.raises(Exception, match="is for profile 'cpu-ort-fp32', not 'x'"):
            store.get("m", profile="x")
    finally:
        repo.close()


def _study(url: str, name: str) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=f"hwprune:{name}", storage=url)


def _screened_search(tmp_path: Path, env: dict[str, str], fast_profile_path: Path, *, name: str, trials: int,
                     mode: str, screening_yaml: str) -> tuple[optuna.Study, str]:
    """A random-sampler digits search on the fast profile with ``--latency mode`` and the given
    screening settings; returns its study, once the search (and its confirmation) has ended, and
    its database URL."""
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"screening: {screening_yaml}\nsampler: random\n")
    args = ["--profiles-dir", str(fast_profile_path.parent), "search", "start", "--name", name, "--example",
            "digits", "--recovery-steps", "0", "--trials", str(trials), "-p", "fast", "--latency", mode,
            "--config", str(config), "--db", url, "--json"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    return _study(url, name), url


@pytest.mark.parametrize("mode", ["hybrid", "predicted"])
def test_screened_search_never_leaves_a_prediction_on_a_front(
    tmp_path: Path, env: dict[str, str], fast_profile_path: Path, mode: str
) -> None:
    # Loose thresholds so that predictions happen on this small search; the front rule still holds.
    study, url = _screened_search(tmp_path, env, fast_profile_path, name="hy", trials=32, mode=mode,
                                  screening_yaml="{min_measured: 5, max_mape: 0.5, max_rel_halfwidth: 10}")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    sources = [t.user_attrs["latency_source"]["fast"] for t in trials]
    assert set(sources) <= {"measured", "predicted"}
    if mode == "predicted":  # hybrid predicts only dominated trials: how many depends on the draws
        assert sources.count("predicted") >= 1, [t.user_attrs.get("screening") for t in trials]
        assert {t.user_attrs["latency_reason"]["fast"] for t in trials} >= {screening.PREDICTED_MODE}
    for trial in trials:
        assert trial.user_attrs["latency"]["fast"]["source"] == trial.user_attrs["latency_source"]["fast"]
    repo = Repository(url)
    try:
        record = repo.get_search("hy")
        # Every front is measured: at confirmation a predicted trial that surfaced gets measured
        # sessions only (a prediction is never a session).
        front = pareto_front(trial_points(study, record), "fast")
        assert front
        verdicts = study.user_attrs
        for point in front:
            # The figure shown is the confirmation's, from measured sessions only.
            assert point.confirmed["fast"]
            if point.predicted.get("fast") and point.signature != record.base.signature:
                verdict = verdicts[f"confirm:fast:{point.signature}"]
                assert len(verdict["sessions"]) >= 2 and point.ratio["fast"] == verdict["ratio"]
                # The prediction is not among the sessions: each one is a fresh measurement.
                first = study.trials[point.trial].user_attrs["latency"]["fast"]["ratio"]
                assert all(session["ratio"] != first for session in verdict["sessions"])
        if mode == "predicted":
            # Nearly every trial was predicted, so predicted trials surfaced onto the front and
            # confirmation measured them (the path the hybrid margin relies on).
            assert any(p.predicted.get("fast") for p in front if p.signature != record.base.signature)
        stored = LatencyModelStore(repo.engine).names()
    finally:
        repo.close()
    if mode == "predicted":
        return  # a predicted search measures too few trials to save its model (every 10 samples)
    assert any(name.startswith("learned-") for name in stored)
    evaluated = runner.invoke(app, ["--profiles-dir", str(fast_profile_path.parent), "latency-model", "eval",
                                    stored[0], "-p", "fast", "--db", url, "--json"], env=env)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["held_out"]["n"] == report["samples"] >= 6
    assert 0 <= report["held_out"]["within_10"] <= 1 and report["held_out"]["worst"] >= report["held_out"]["mape"]


@pytest.mark.parametrize("args, message", [
    (["latency-model", "eval", "nope", "-p", "cpu-ort-fp32", "--db", "sqlite:///{tmp}/missing.db"],
     "no database file"),
    (["latency-model", "eval", "nope", "-p", "no-such-profile", "--db", "sqlite:///{tmp}/x.db"], "no-such-profile"),
    (["latency-model", "build", "--example", "digits", "-p", "jetson-orin-trt-fp16", "--db", "sqlite:///{tmp}/x.db"],
     "no live agent serves remote profile"),
    (["predict", "--example", "digits", "--plan", "{tmp}/missing.yaml", "-p", "cpu-ort-fp32",
      "--db", "sqlite:///{tmp}/x.db"], "missing.yaml"),
    (["search", "start", "--name", "x", "--example", "digits", "--latency", "sometimes", "--trials", "2",
      "--db", "sqlite:///{tmp}/x.db"], "latency"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path: Path, env: dict[str, str], args: list[str],
                                                message: str) -> None:
    Repository(f"sqlite:///{tmp_path}/x.db").close()
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1


def test_predict_without_a_model_says_how_to_get_one(tmp_path: Path, env: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    Repository(url).close()
    plan = tmp_path / "plan.yaml"
    plan.write_text("channels: {}\n")
    result = runner.invoke(app, ["predict", "--example", "digits", "--plan", str(plan), "-p", "cpu-ort-fp32",
                                 "--db", url], env=env)
    assert result.exit_code == 2, result.output
    assert "latency-model build" in result.output


def test_hybrid_stores_why_and_confirms_what_the_margin_let_through(
    tmp_path: Path, env: dict[str, str], fast_profile_path: Path
) -> None:
    """The relaxed front rule (prediction minus a margin of the held-out error, here no margin)
    predicts trials the interval rule would have measured; any of them that lands on the front is
    measured in fresh sessions before the search ends, and every trial says which rule decided."""
    study, url = _screened_search(
        tmp_path, env, fast_profile_path, name="mg", trials=30, mode="hybrid",
        screening_yaml="{min_measured: 5, max_mape: 0.5, max_rel_halfwidth: 10, front_margin: 0}")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    reasons = [t.user_attrs["latency_reason"]["fast"] for t in trials]
    assert set(reasons) <= set(screening.REASONS), reasons
    assert reasons[0] == screening.BASE
    for trial, reason in zip(trials, reasons, strict=True):
        source = trial.user_attrs["latency_source"]["fast"]
        # Predicted exactly when the rule that decided was the dominated one (hybrid mode).
        assert (source == "predicted") == (reason == screening.DOMINATED), (trial.number, reason, source)
    # Until min_measured trials were measured, nothing is predicted.
    measured_before = 0
    for trial, reason in zip(trials, reasons, strict=True):
        if measured_before < 5 and reason not in (screening.BASE, screening.CACHED):
            assert reason == screening.WARMUP, (trial.number, reason)
        if trial.user_attrs["latency_source"]["fast"] == "measured":
            measured_before += 1
    assert reasons.count(screening.DOMINATED) >= 1, reasons
    repo = Repository(url)
    try:
        record = repo.get_search("mg")
    finally:
        repo.close()
    front = pareto_front(trial_points(study, record), "fast")
    assert front
    for point in front:
        assert point.confirmed["fast"], point.trial
        if point.predicted.get("fast"):
            # Surfaced: its figure is the confirmation's, from two or three measured sessions.
            verdict = study.user_attrs[f"confirm:fast:{point.signature}"]
            assert len(verdict["sessions"]) >= 2 and point.ratio["fast"] == verdict["ratio"]
