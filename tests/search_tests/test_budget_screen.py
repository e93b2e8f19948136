"""Budget-aware proposals: with a latency budget and a band, a plan the latency model predicts far
outside the band is neither recovered nor measured, and does not count toward the trials."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from search.cli.main import app
from search.storage.record import read_trials
from search.study import screening

runner = CliRunner()


def _search(tmp_path: Path, env: dict[str, str], profile: Path, *, band: str) -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    config = tmp_path / "budget.yaml"
    config.write_text(f"screening: {{min_measured: 10, max_mape: 0.5{band}}}\nsampler: random\n")
    args = ["--profiles-dir", str(profile.parent), "search", "start", "--name", "b", "--example", "digits",
            "--recovery-steps", "0", "--trials", "14", "-p", "fast", "--latency-budget-ratio", "0.25",
            "--config", str(config), "--db", url, "--json"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name="hwprune:b", storage=url)


@pytest.fixture
def env(hwprune_cache: Path, digits_bundle: Any) -> dict[str, str]:
    return {"HWPRUNE_CACHE": str(hwprune_cache), "HWPRUNE_HEARTBEAT_S": "1", "HWPRUNE_GRACE_S": "3"}


def test_plans_predicted_far_outside_the_budget_are_not_tried(
    tmp_path: Path, env: dict[str, str], fast_profile_path: Path
) -> None:
    study = _search(tmp_path, env, fast_profile_path, band=", budget_band: 0.15")
    records = read_trials(study)
    screened = [t for t in records if t.budget_screened]
    assert screened, "no plan was predicted outside the band on this search"
    for trial in screened:
        assert trial.state == "PRUNED"
        # Neither recovered nor measured: no recovery report, no latency, no error.
        assert trial.recovery is None and not trial.latency and trial.error is None
        reason = str(trial.budget_screened)
        low, high = map(float, re.search(r"\[([\d.]+), ([\d.]+)\]", reason).groups())  # type: ignore[union-attr]
        assert low > 0.25 * 1.15 or high < 0.25 * 0.85, reason
    # Screened proposals do not use up the trials: 14 were recovered and measured.
    tried = [t for t in records if t.state in ("COMPLETE", "PRUNED") and not t.budget_screened]
    assert len(tried) == 14
    # Until min_measured trials (the base model included) were measured the predictor has not
    # earned a judgement, and at most 3 proposals per trial are screened out, so a budget no plan
    # meets still ends.
    assert all(t.number >= 10 for t in screened)
    assert len(screened) <= screening.MAX_SCREENED_PER_TRIAL * 14


def test_without_a_band_every_plan_is_tried(tmp_path: Path, env: dict[str, str], fast_profile_path: Path) -> None:
    study = _search(tmp_path, env, fast_profile_path, band="")
    records = read_trials(study)
    assert not [t for t in records if t.budget_screened]
    assert all(t.recovery is not None for t in records[1:] if t.state == "COMPLETE")
