"""A search's model work on its device, end to end on this machine's CPU: what is stored with the
search and each trial, the device lock's waits in stage times, exports replayed on the trial's
kind of device, and GPUs refused in one line where there are none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from typer.testing import CliRunner

import search.api as hw
from search.cli.main import app
from search.config import cpu_count
from search.errors import ConfigError
from search.pipeline.device import replay_device
from search.storage.record import read_trials

PLUGIN = (Path(__file__).parent / "tiny_plugin.py").read_text()  # a 2-conv net on 8x8 noise
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@pytest.fixture
def settings(tmp_path: Path, fast_profile_path: Path, monkeypatch: pytest.MonkeyPatch) -> hw.Settings:
    name = f"devsmall_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HWPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HWPRUNE_TEST_PLUGIN", f"{name}:bundle")
    return hw.Settings(db=f"sqlite:///{tmp_path / 'd.db'}", profiles_dirs=(fast_profile_path.parent,),
                       cache=tmp_path / "cache")


def _config(**extra: Any) -> dict[str, Any]:
    import os

    return {"name": "dev", "model": os.environ["HWPRUNE_TEST_PLUGIN"], "targets": ["fast"], "trials": 5,
            "recovery": {"steps": 2}, **extra}


@needs_no_gpu
def test_a_search_stores_where_its_model_work_ran_and_exports_replay_there(
        settings: hw.Settings, tmp_path: Path) -> None:
    result = hw.run_search(_config(), settings=settings, confirm=False)
    assert result.summary.completed == 5
    runtime = settings.runtime()
    from search.study.runtime import find_record, load_study

    stored = find_record("dev", runtime)
    # Asked for auto, which fell back to the CPU here; the thread count was fixed when it was made.
    assert stored.config.device == "auto" and stored.base.model_device == "cpu"
    assert stored.config.recovery.threads == cpu_count()
    trials = [t for t in read_trials(load_study(stored, runtime)) if t.has_figures]
    assert {t.model_device for t in trials} == {"cpu"}
    assert {t.recovery_threads for t in trials} == {cpu_count()}
    # Every trial's model work held the device lock; its lock files live in the one cache folder.
    assert sorted(p.name for p in (tmp_path / "cache" / "locks").iterdir()) == ["cpu.gate", "cpu.lock"]
    pruned = next(t for t in trials if t.signature != stored.base.signature)
    # The export re-makes the trial on its kind of device and reproduces its sha256.
    manifests = hw.export_trials("dev", tmp_path / "out", trial=pruned.number, settings=settings)
    assert manifests[0]["trial"] == pruned.number
    with pytest.raises(ConfigError, match=r"device 'cuda' is not available: torch sees no CUDA device"):
        hw.export_trials("dev", tmp_path / "out2", trial=pruned.number, device="cuda", settings=settings)


@needs_no_gpu
@pytest.mark.parametrize("args", [
    ["search", "start", "--name", "g", "--example", "digits", "--device", "cuda"],
    ["search", "start", "--name", "g", "--example", "digits", "--device", "cuda:3"],
    ["search", "start", "--name", "g", "--example", "digits", "--device", "gpu"],
])
def test_a_cuda_device_is_refused_in_one_line_and_nothing_is_stored(args: list[str], tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    result = CliRunner().invoke(app, [*args, "--db", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "device" in lines[0], result.output
    assert not db.exists() or "hwprune:g" not in optuna.study.get_all_study_names(f"sqlite:///{db}")


def test_replay_runs_on_the_kind_of_device_a_trial_was_recovered_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from search.pipeline import device as device_module

    assert replay_device("cpu", None, trial=3).name == "cpu"
    with pytest.raises(ConfigError, match=r"trial 3 was recovered on cpu; re-making it on .* would give other "
                                          r"weights"):
        monkeypatch.setattr(device_module, "_cuda_count", lambda: 1)  # a simulated GPU: the kinds differ
        replay_device("cpu", "cuda", trial=3)
    monkeypatch.setattr(device_module, "_cuda_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"trial 5 was recovered on cuda:0 and this machine has no cuda device"):
        replay_device("cuda:0", None, trial=5)
    monkeypatch.setattr(device_module, "_cuda_count", lambda: 2)
    assert replay_device("cuda:1", None, trial=5).name == "cuda:0"
    assert replay_device("cuda:1", "cuda:1", trial=5).name == "cuda:1"
