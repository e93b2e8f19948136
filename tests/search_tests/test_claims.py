"""No enqueued trial runs twice: worker processes race for one study's queue, on SQLite and
PostgreSQL, with a short heartbeat and one worker SIGKILLed inside a trial (its plan is retried)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

PLANS = 40


def _stress() -> ModuleType:
    path = Path(__file__).with_name("claim_stress.py")
    spec = importlib.util.spec_from_file_location("claim_stress", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["claim_stress"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kill_one", [True, False], ids=["one-worker-killed", "all-live"])
def test_every_enqueued_plan_runs_once(db_url: str, tmp_path: Path, kill_one: bool) -> None:
    stress = _stress()
    stress.prepare(db_url, "claims", PLANS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    outcome = stress.run_round(db_url, "claims", tmp_path / "starts.log", mode="hwprune", workers=4,
                               run_s=60.0, kill_one=kill_one, env=env)
    assert outcome.failed_workers == []
    assert outcome.duplicated_starts == []  # no trial was started by two workers
    assert outcome.taken_over == 0
    assert outcome.plan_completions == {plan: 1 for plan in range(PLANS)}  # the killed plan too, by its retry
    assert outcome.left_running_or_waiting == 0
