"""Stress of the trial claim: several worker processes run one study's enqueued trials.

Used by ``test_claims.py`` and ``bench/claims.py``. Run as a script it is one worker; as a module
it gives the parent's side (``prepare`` and ``check``). Every trial a worker starts is appended to
a log (one short line, an atomic append) so that a trial run by two workers shows up even though
the study holds only one row for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

HEARTBEAT_S, GRACE_S = 1, 3


def _storage(url: str, mode: str) -> optuna.storages.RDBStorage:
    if mode == "hwprune":
        from search.storage.study_storage import open_study_storage

        return open_study_storage(url, heartbeat_s=HEARTBEAT_S, grace_s=GRACE_S, worker=True)
    # Optuna's storage as hwprune opened it before the claim was fixed: the race is open.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
            heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))


def worker(url: str, study_name: str, mode: str, log: Path, run_s: float, kill_first: bool) -> None:
    """Run trials until every enqueued plan completed (at most ``run_s`` seconds); with
    ``kill_first`` die by SIGKILL inside the first enqueued trial this worker claims."""
    from search.study.trial_loop import LoopLimits, run_trials

    storage = _storage(url, mode)
    study = optuna.load_study(study_name=study_name, storage=storage)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_int("x", 0, 1_000_000)
        with log.open("a") as out:
            out.write(f"{trial.number} {os.getpid()}\n")
        if kill_first and "plan" in trial.user_attrs:  # an enqueued trial: its retry must run once
            os.kill(os.getpid(), signal.SIGKILL)
        # Enqueued trials are quick; sampled ones (once the queue is empty) slower, so that the
        # workers are still there when the killed trial's heartbeat goes stale and is retried.
        time.sleep(0.05 if "plan" in trial.user_attrs else 0.3)
        return float(x)

    # Short runs of the loop until every enqueued plan completed (the killed one by its retry) and
    # nothing waits: a time budget alone ends early on a loaded machine, and a trial budget can be
    # met by sampled trials before the killed trial's heartbeat goes stale.
    totals = {"completed": 0, "failed": 0, "taken_over": 0}
    deadline = time.monotonic() + run_s
    while time.monotonic() < deadline:
        result = run_trials(study, storage, objective, LoopLimits(timeout_s=0.5))
        totals["completed"] += result.completed
        totals["failed"] += result.failed
        totals["taken_over"] += result.taken_over
        if _all_plans_done(study):
            break
    print(json.dumps(totals))


def _all_plans_done(study: optuna.Study) -> bool:
    trials = study.get_trials(deepcopy=False)
    plans = {t.user_attrs["plan"] for t in trials if "plan" in t.user_attrs}
    done = {t.user_attrs["plan"] for t in trials if "plan" in t.user_attrs and t.state == TrialState.COMPLETE}
    return plans == done and not any(t.state == TrialState.WAITING for t in trials)


def prepare(url: str, study_name: str, plans: int) -> None:
    """A study holding ``plans`` enqueued trials, each marked with its plan number."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(study_name=study_name, storage=url)
        for plan in range(plans):
            study.enqueue_trial({"x": plan}, user_attrs={"plan": plan})


@dataclass(frozen=True)
class Outcome:
    duplicated_starts: list[int]  # trial numbers that more than one worker started
    plan_completions: dict[int, int]  # plan -> COMPLETE trials that ran it
    failed_workers: list[int]  # exit codes of workers that should have lived
    taken_over: int  # trials a worker found finished by another
    left_running_or_waiting: int
    trials: int


def run_round(url: str, study_name: str, log: Path, *, mode: str, workers: int, run_s: float, kill_one: bool,
              env: dict[str, str] | None = None) -> Outcome:
    """Start ``workers`` processes on a prepared study, wait for them, and read what happened."""
    script = Path(__file__).resolve()
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), url, study_name, mode, str(log), str(run_s),
             "1" if kill_one and i == 0 else "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for i in range(workers)
    ]
    failed: list[int] = []
    taken_over = 0
    for index, process in enumerate(processes):
        out, err = process.communicate(timeout=run_s + 120)
        if kill_one and index == 0:
            continue
        if process.returncode != 0:
            failed.append(process.returncode)
            sys.stderr.write(err.decode(errors="replace"))
            continue
        taken_over += json.loads(out.decode().strip().splitlines()[-1])["taken_over"]
    starts = Counter(int(line.split()[0]) for line in log.read_text().splitlines())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=study_name, storage=url)
        trials = study.get_trials(deepcopy=False)
    completions: Counter[int] = Counter(
        int(t.user_attrs["plan"]) for t in trials if t.state == TrialState.COMPLETE and "plan" in t.user_attrs)
    return Outcome(
        duplicated_starts=sorted(n for n, count in starts.items() if count > 1),
        plan_completions=dict(completions),
        failed_workers=failed,
        taken_over=taken_over,
        left_running_or_waiting=sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        trials=len(trials),
    )


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), float(sys.argv[5]), sys.argv[6] == "1")
