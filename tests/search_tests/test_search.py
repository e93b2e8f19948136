"""End-to-end searches on the digits example, on SQLite and PostgreSQL, through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState
from typer.testing import CliRunner

from search.cli.main import app
from search.storage import Repository

runner = CliRunner()
FAST = ["--example", "digits", "--recovery-steps", "3"]


@pytest.fixture
def env(hwprune_cache: Path, digits_bundle: Any) -> dict[str, str]:
    return {"HWPRUNE_CACHE": str(hwprune_cache), "HWPRUNE_HEARTBEAT_S": "1", "HWPRUNE_GRACE_S": "3"}


def _study(db_url: str, name: str) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=f"hwprune:{name}", storage=db_url)


def _invoke(args: list[str], env: dict[str, str]) -> Any:
    result = runner.invoke(app, args, env=env)
    return result


def test_search_end_to_end(db_url: str, env: dict[str, str], tmp_path: Path) -> None:
    result = _invoke(["search", "start", "--name", "e2e", *FAST, "--trials", "5", "--db", db_url, "--json"], env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["search"]["completed"] == 5
    study = _study(db_url, "e2e")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 5
    base = trials[0]
    assert base.number == 0 and base.user_attrs["base"] is True
    for key, value in base.params.items():  # dense: the widest option of every decision
        distribution = base.distributions[key]
        assert value == (distribution.high if isinstance(distribution, IntDistribution) else "dense")
    assert base.user_attrs["latency"]["cpu-ort-fp32"]["ratio"] == 1.0
    for trial in trials:
        attrs = trial.user_attrs
        for key in ("error", "accuracy", "latency_us", "macs", "params", "signature", "artifact_sha256", "plan"):
            assert key in attrs, key
        assert trial.value == pytest.approx(attrs["reward"])
        assert attrs["macs"] <= base.user_attrs["macs"]
    # Pareto JSON keys and consistency with the stored trials.
    pareto = _invoke(["pareto", "e2e", "--db", db_url, "--json"], env)
    assert pareto.exit_code == 0, pareto.output
    rows = json.loads(pareto.stdout)
    assert rows
    for row in rows:
        for key in ("trial", "error", "accuracy", "latency_us", "speedup", "macs", "params"):
            assert key in row
        # Every front trial was confirmed by a second session when the search ended; the figure
        # shown is the confirmed ratio times the base model's latency as re-measured then.
        assert row["confirmed"] == {"cpu-ort-fp32": True}
        stored = study.trials[row["trial"]].user_attrs
        if stored["signature"] == base.user_attrs["signature"]:
            assert row["ratio"]["cpu-ort-fp32"] == 1.0
        else:
            verdict = study.user_attrs[f"confirm:cpu-ort-fp32:{stored['signature']}"]
            assert len(verdict["sessions"]) in (2, 3)
            assert verdict["sessions"][0]["ratio"] == stored["latency"]["cpu-ort-fp32"]["ratio"]
            assert verdict["ratio"] >= min(s["ratio"] for s in verdict["sessions"])
            assert row["ratio"]["cpu-ort-fp32"] == verdict["ratio"]
            low, high = verdict["interval"]
            assert low < verdict["ratio"] < high
        base_now = study.user_attrs["base_latency_now"]["cpu-ort-fp32"]
        assert row["latency_us"]["cpu-ort-fp32"] == pytest.approx(row["ratio"]["cpu-ort-fp32"] * base_now)
        assert {"prune", "export", "measure:cpu-ort-fp32"} <= set(stored["stage_s"])
    # Status and list.
    status = json.loads(_invoke(["search", "status", "e2e", "--db", db_url, "--json"], env).stdout)
    assert status["completed"] == 5 and status["trials_asked"] == 5
    assert status["confirmed_trials"] >= len(rows)
    assert status["stage_median_s"]["export"] > 0
    text = _invoke(["search", "status", "e2e", "--db", db_url], env).stdout
    assert "median seconds per trial stage: " in text and "trials: 5 complete;" in text
    listing = json.loads(_invoke(["search", "list", "--db", db_url, "--json"], env).stdout)
    assert [row["name"] for row in listing] == ["e2e"]
    # Export re-materialises bit-identically (the export checks the stored sha256 itself).
    number = rows[0]["trial"]
    out = tmp_path / "one"
    exported = _invoke(["export", "e2e", "--trial", str(number), "--out", str(out), "--db", db_url], env)
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnx_sha256"] == study.trials[number].user_attrs["artifact_sha256"]
    front = tmp_path / "front"
    exported = _invoke(["export", "e2e", "--pareto", "--out", str(front), "--db", db_url], env)
    assert exported.exit_code == 0, exported.output
    assert {p.name for p in front.iterdir()} == {f"trial-{row['trial']}" for row in rows}


def test_resume_extends_and_cache_avoids_remeasuring(db_url: str, env: dict[str, str]) -> None:
    first = _invoke(["search", "start", "--name", "r", *FAST, "--trials", "3", "--db", db_url, "--json"], env)
    assert first.exit_code == 0, first.output
    resumed = _invoke(["search", "resume", "r", "--trials", "6", "--db", db_url, "--json"], env)
    assert resumed.exit_code == 0, resumed.output
    study = _study(db_url, "r")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 6
    signatures = {t.user_attrs["signature"] for t in complete}
    repo = Repository(db_url)
    try:
        # One cached measurement per distinct pruned architecture: the base is measured once
        # at creation, and a repeated architecture is never measured again.
        assert repo.count_measurements() == len(signatures) - 1
    finally:
        repo.close()
    cached = [t for t in complete[1:] if t.user_attrs["latency"]["cpu-ort-fp32"]["cached"]]
    assert len(cached) == len(complete) - len(signatures)


def test_incompatible_restart_is_refused(db_url: str, env: dict[str, str]) -> None:
    assert _invoke(["search", "start", "--name", "c", *FAST, "--trials", "2", "--db", db_url], env).exit_code == 0
    before = len(_study(db_url, "c").trials)
    result = _invoke(["search", "start", "--name", "c", "--example", "digits", "--recovery-steps", "7",
                      "--sampler", "random", "--trials", "3", "--db", db_url], env)
    assert result.exit_code == 2
    assert "exists with another configuration" in result.stderr
    assert "recovery" in result.stderr and "sampler: 'tpe' -> 'random'" in result.stderr
    assert len(_study(db_url, "c").trials) == before
    # Same config with a larger budget resumes.
    again = _invoke(["search", "start", "--name", "c", *FAST, "--trials", "3", "--db", db_url], env)
    assert again.exit_code == 0, again.output
    assert len(_study(db_url, "c").get_trials(states=(TrialState.COMPLETE,))) == 3


BAD_CONFIGS = [
    (["--name", "x"], "give exactly one of 'example'"),
    (["--name", "x", "--example", "digits", "--model", "pkg.mod:fn"], "give exactly one of 'example'"),
    (["--name", "bad name!", "--example", "digits"], "field 'name'"),
    (["--name", "x", "--example", "digits", "--sampler", "cmaes"], "field 'sampler': Input should be 'tpe'"),
    (["--name", "x", "--example", "digits", "--objective", "speed"], "field 'objective'"),
    (["--name", "x", "--example", "digits", "--trials", "0"],
     "field 'trials': Input should be greater than or equal to 1"),
    (["--name", "x", "--example", "digits", "--error-ceiling", "1.5"], "field 'constraints.error_ceiling'"),
    (["--name", "x", "--example", "digits", "--latency-budget-ratio", "0"], "field 'constraints.latency_budget_ratio'"),
    (["--name", "x", "--example", "digits", "--importance", "fisher"], "field 'importance'"),
    (["--name", "x", "--example", "digits", "-p", "cpu-ort-fp32", "-p", "cpu-ort-fp32"], "targets repeat"),
    (["--name", "x", "--example", "digits", "-p", "gpu-9000"], "no hardware profile 'gpu-9000'; known:"),
    (["--name", "x", "--example", "digits", "-p", "jetson-orin-ort-cpu"], "no live agent serves remote profile"),
    (["--name", "x", "--example", "mnist9"], "no built-in example 'mnist9'"),
    (["--name", "x", "--model", "no_such_module:make"], "cannot import model plugin module 'no_such_module'"),
    (["--name", "x", "--example", "digits", "--recovery-steps", "-1"], "field 'recovery.steps'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_CONFIGS)
def test_bad_configs_are_refused_and_store_nothing(
    tmp_path: Path, env: dict[str, str], args: list[str], message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    result = _invoke(["search", "start", *args, "--db", url], env)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if (tmp_path / "h.db").exists():
        repo = Repository(url)
        try:
            assert repo.list_searches() == []
        finally:
            repo.close()


def test_target_whose_backend_cannot_run_here_stores_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    from latency_models.trt import cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    url = f"sqlite:///{tmp_path / 'h.db'}"
    result = _invoke(["search", "start", "--name", "g", "--example", "digits", "-p", "ampere-trt-fp16",
                      "--db", url], env)
    assert result.exit_code == 2
    assert "needs the tensorrt package and an NVIDIA GPU" in result.stderr
    repo = Repository(url)
    try:
        assert repo.list_searches() == [] and repo.get_artifact("0" * 64) is None
        from sqlalchemy import text

        with repo.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM hwprune_artifacts")).scalar_one() == 0
    finally:
        repo.close()


def test_bad_config_file(tmp_path: Path, env: dict[str, str]) -> None:
    config = tmp_path / "search.yaml"
    config.write_text("name: f\nexample: digits\nrecovery: {stepz: 3}\n")
    result = _invoke(["search", "start", "--config", str(config), "--db", f"sqlite:///{tmp_path / 'h.db'}"], env)
    assert result.exit_code == 2
    assert ("unknown field 'recovery.stepz'; allowed: steps, lr, optimizer, warmup, distill, bn_batches, "
            "holdout_batches, batchnorm, threads, version") in result.stderr


def test_unknown_search(tmp_path: Path, env: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    assert _invoke(["db", "upgrade", "--db", url], env).exit_code == 0  # a database without that search
    for args in (["search", "resume", "nope"], ["search", "status", "nope"], ["pareto", "nope"]):
        result = _invoke([*args, "--db", url], env)
        assert result.exit_code == 2
        assert "no search named 'nope'" in result.stderr


def _completed(db_url: str, name: str) -> tuple[int, int]:
    try:
        study = _study(db_url, name)
    except KeyError:
        return 0, 0
    trials = study.get_trials(deepcopy=False)
    return (sum(t.state == TrialState.COMPLETE for t in trials), sum(t.state == TrialState.RUNNING for t in trials))


def _running_has_plan(db_url: str, name: str) -> bool:
    running = _study(db_url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(running) == 1 and "plan" in running[0].user_attrs


def test_resume_after_sigkill(db_url: str, env: dict[str, str]) -> None:
    """A real SIGKILL of a real search process; the resumed search loses and duplicates nothing."""
    trials = 6
    start = [sys.executable, "-m", "search", "search", "start", "--name", "k", *FAST,
             "--trials", str(trials), "--db", db_url]
    resume = [sys.executable, "-m", "search", "search", "resume", "k", "--db", db_url]
    killed: list[int] = []
    before: dict[int, list[float] | None] = {}
    # The kill can land in the few milliseconds between two trials; then nothing was running and
    # the search is resumed in a new process and killed again (at most three times).
    for attempt in range(3):
        process = subprocess.Popen(start if attempt == 0 else resume, env={**os.environ, **env},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        try:
            while True:
                done, running = _completed(db_url, "k")
                # Kill once the running trial has its whole plan (it is pruning, recovering or
                # measuring), so that its retry must reproduce exactly that plan.
                if done >= 2 + attempt and running == 1 and _running_has_plan(db_url, "k"):
                    break
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                assert time.monotonic() < deadline, "search made no progress"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
            if process.stderr is not None:
                process.stderr.close()
        study = _study(db_url, "k")
        before = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
        killed = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
        if killed:
            break
    assert len(killed) == 1
    time.sleep(3.5)  # past the grace period: the killed trial's heartbeat is stale
    result = _invoke(["search", "resume", "k", "--db", db_url, "--json"], env)
    assert result.exit_code == 0, result.output
    study = _study(db_url, "k")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == trials
    assert len({t.number for t in complete}) == trials
    for number, values in before.items():  # nothing completed was lost or changed
        assert study.trials[number].values == values
    assert study.trials[killed[0]].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == study.trials[killed[0]].params
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_parallel_workers(db_url: str, env: dict[str, str]) -> None:
    """Two worker processes on one search share the study; each trial number is unique."""
    result = _invoke(["search", "start", "--name", "p", *FAST, "--trials", "6", "--workers", "2",
                      "--db", db_url, "--json"], env)
    assert result.exit_code == 0, result.output
    study = _study(db_url, "p")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    # Each worker stops after the trial that reaches the budget: at most one extra per worker.
    assert 6 <= len(complete) <= 7
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len({t.number for t in complete}) == len(complete)


FLAKY_PLUGIN = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search.pipeline.bundle import ModelBundle, classification_error
from search.errors import SearchError

calls = {"n": 0}
FAIL_WITH = SearchError
FAIL_FROM = None


VAL = []


def error_fn(model, batches):
    # Only scoring on the validation loader counts (recovery also scores its held-out slice).
    # Call 1 scores the base model; call 2 is the first pruned trial's evaluation: it fails.
    if batches is not VAL[0]:
        return classification_error(model, batches)
    calls["n"] += 1
    if calls["n"] == 2 or (FAIL_FROM is not None and calls["n"] >= FAIL_FROM):
        raise FAIL_WITH("validation shard unavailable")
    return classification_error(model, batches)


def bundle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    val = DataLoader(TensorDataset(x, y), batch_size=16)
    VAL[:] = [val]
    return ModelBundle(name="flaky", model=model, example_input=x[:1], train_loader=loader,
                       val_loader=val, error_fn=error_fn)
'''


@pytest.fixture
def flaky_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"flaky_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FLAKY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_failing_trial_is_stored_and_the_search_goes_on(
    tmp_path: Path, env: dict[str, str], flaky_plugin: str
) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    result = _invoke(["search", "start", "--name", "f", "--model", f"{flaky_plugin}:bundle", "--trials", "4",
                      "--recovery-steps", "2", "--db", url, "--json"], env)
    assert result.exit_code == 0, result.output
    study = _study(url, "f")
    failures = study.get_trials(states=(TrialState.FAIL,))
    assert len(failures) == 1  # the second evaluation, whichever trial made it
    failed = failures[0]
    assert failed.user_attrs["fail_stage"] == "evaluate"
    assert failed.user_attrs["fail_reason"] == "SearchError: validation shard unavailable"
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4


def test_unexpected_error_fails_only_its_trial(tmp_path: Path, env: dict[str, str], flaky_plugin: str) -> None:
    """Any exception, not only hwprune's own, fails one trial; the search goes on."""
    import importlib

    module = importlib.import_module(flaky_plugin)
    module.__dict__["FAIL_WITH"] = ZeroDivisionError  # a bug in the user's code, not a known error
    url = f"sqlite:///{tmp_path / 'h.db'}"
    result = _invoke(["search", "start", "--name", "b", "--model", f"{flaky_plugin}:bundle", "--trials", "4",
                      "--recovery-steps", "2", "--db", url, "--json"], env)
    assert result.exit_code == 0, result.output
    study = _study(url, "b")
    failures = study.get_trials(states=(TrialState.FAIL,))
    assert len(failures) == 1
    trial = failures[0]
    assert trial.user_attrs["fail_stage"] == "evaluate"
    assert trial.user_attrs["fail_reason"] == "ZeroDivisionError: validation shard unavailable"
    assert "ZeroDivisionError" in trial.user_attrs["fail_traceback"]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4


def test_consecutive_failures_stop_the_search(tmp_path: Path, env: dict[str, str], flaky_plugin: str) -> None:
    import importlib

    module = importlib.import_module(flaky_plugin)
    module.__dict__["FAIL_FROM"] = 2  # every evaluation after the base model's fails
    url = f"sqlite:///{tmp_path / 'h.db'}"
    result = _invoke(["search", "start", "--name", "s", "--model", f"{flaky_plugin}:bundle", "--trials", "10",
                      "--recovery-steps", "1", "--max-failures", "3", "--db", url], env)
    assert result.exit_code == 1, result.output
    study = _study(url, "s")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 3
    assert (f"3 trials failed in a row; the first was trial {failed[0].number} at evaluate: SearchError: "
            "validation shard unavailable") in " ".join(result.stderr.split())
    # Completed: the base, and any sampled plan that is the dense model again (it is not re-scored).
    assert all(t.user_attrs["signature"] == study.trials[0].user_attrs["signature"]
               for t in study.get_trials(states=(TrialState.COMPLETE,)))


def test_artifact_store_keeps_what_fronts_need_and_the_rest_is_remade(tmp_path: Path, env: dict[str, str]) -> None:
    """ONNX bytes live in the store beside the database, never in it; pruning keeps the base model
    and the fronts; a pruned base model is exported again (same sha256) when the search resumes."""
    from sqlalchemy import inspect, text

    from search.storage.artifacts import ArtifactStore

    url = f"sqlite:///{tmp_path / 's.db'}"
    started = _invoke(["search", "start", "--name", "a", *FAST, "--trials", "4", "--db", url, "--json"], env)
    assert started.exit_code == 0, started.output
    study = _study(url, "a")
    shas = {t.user_attrs["artifact_sha256"] for t in study.get_trials(states=(TrialState.COMPLETE,))}
    base_sha = study.trials[0].user_attrs["artifact_sha256"]
    store = ArtifactStore(str(tmp_path / "s.artifacts"))
    assert shas <= store.names()
    repo = Repository(url)
    try:
        assert "content" not in {c["name"] for c in inspect(repo.engine).get_columns("hwprune_artifacts")}
        with repo.engine.connect() as connection:
            rows = connection.execute(text("SELECT sha256, size_bytes FROM hwprune_artifacts")).all()
        sizes: dict[str, int] = {str(sha): int(size) for sha, size in rows}
        assert set(sizes) == store.names() and sizes[base_sha] > 1000
    finally:
        repo.close()
    pruned = _invoke(["db", "prune-artifacts", "--min-age", "0", "--db", url], env)
    assert pruned.exit_code == 0, pruned.output
    front = {study.trials[row["trial"]].user_attrs["artifact_sha256"]
             for row in json.loads(_invoke(["pareto", "a", "--db", url, "--json"], env).stdout)}
    assert store.names() == {base_sha} | front
    for sha in store.names():
        store.delete(sha)
    (Path(env["HWPRUNE_CACHE"]) / "artifacts" / f"{base_sha}.onnx").unlink(missing_ok=True)
    resumed = _invoke(["search", "resume", "a", "--trials", "5", "--db", url, "--json"], env)
    assert resumed.exit_code == 0, resumed.output
    assert base_sha in store.names() and store.read_bytes(base_sha) is not None
