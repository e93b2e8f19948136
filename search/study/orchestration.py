"""One search run, end to end: its trials (in this process or in worker processes), the front's
confirmation, the final recovery and what a user is told at the end. ``search.api`` calls this,
and the CLI calls ``search.api``: there is one way to run a search.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from search import progress
from search.config import CACHE_ENV, PROFILES_ENV
from search.errors import SearchError
from search.storage.record import Confirmation
from search.study.controller import Prepared, confirm_front, run_worker
from search.study.final_recovery import recover_front
from search.study.pareto import pareto_front
from search.study.read import ParetoRow, SearchSummary, best_is_base_warning, pareto_rows, summary, trial_points
from search.study.retention import prune_artifacts
from search.study.runtime import Runtime, counted, load_study

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SearchProgress:
    """Where a running search stands, after each trial: trials counted toward the budget
    (completed and pruned), trials asked for, the best feasible reward and the primary front's size."""

    counted: int
    asked: int | None
    best_reward: float | None
    front_size: int


@dataclass(frozen=True, slots=True)
class SearchResult:
    """A finished run: the search's summary, its primary target's front and the warnings for the
    user. ``to_dict`` is what ``hwprune search start --json`` prints."""

    summary: SearchSummary
    pareto: list[ParetoRow]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"search": self.summary.to_dict(), "pareto": [row.to_dict() for row in self.pareto],
                "warnings": list(self.warnings)}


ProgressCallback = Callable[[SearchProgress], None]
ConfirmedCallback = Callable[[int, str, Confirmation], None]


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO; hwprune reports trials itself (debug logging keeps it)."""
    if logging.getLogger().level > logging.DEBUG:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _progress(study: optuna.Study, prepared: Prepared) -> SearchProgress:
    points = trial_points(study)
    rewards = [p.reward for p in points if p.reward is not None and p.feasible]
    return SearchProgress(counted(study), prepared.config.trials, max(rewards) if rewards else None,
                          len(pareto_front(points, prepared.config.targets[0])))


def run_prepared(prepared: Prepared, runtime: Runtime, *, workers: int = 1, confirm: bool = True,
                 on_trial: ProgressCallback | None = None, on_confirmed: ConfirmedCallback | None = None,
                 debug: bool = False) -> SearchResult:
    """Run a prepared search to its budget (``workers`` processes), confirm its front, recover the
    front for ``final_steps`` and return what a user is shown."""

    def update(study: optuna.Study, _trial: Any = None) -> None:
        if on_trial is not None:
            on_trial(_progress(study, prepared))

    if workers == 1:
        run_worker(prepared.config.name, runtime, on_trial=update, prepared=prepared)
    else:
        _run_processes(prepared, runtime, workers, update, debug=debug)
    if confirm:
        with progress.task("confirming the Pareto front's latencies"):
            confirm_front(prepared, runtime, on_confirmed=on_confirmed)
    steps = prepared.config.final_steps
    if steps > 0:
        with progress.task(f"final recovery of the Pareto front ({steps} steps)"):
            recover_front(prepared, runtime, steps=steps)
    return finish(prepared, runtime)


def finish(prepared: Prepared, runtime: Runtime) -> SearchResult:
    """Trim the artifact store and read the search back: summary, primary front, warnings."""
    # The store keeps only what jobs and fronts need: the rest is re-made from plans on demand.
    pruned = prune_artifacts(runtime)
    logger.info("artifact store: %d removed (%d bytes), %d kept", pruned.removed, pruned.freed_bytes, pruned.kept)
    study = load_study(prepared.record, runtime)
    info = summary(prepared.record, study)
    rows = pareto_rows(prepared.record, study, prepared.config.targets[0])
    warning = best_is_base_warning(info, prepared.config)
    return SearchResult(info, rows, [warning] if warning else [])


def _run_processes(prepared: Prepared, runtime: Runtime, workers: int,
                   update: Callable[[optuna.Study], None], *, debug: bool) -> None:
    processes = _spawn_workers(prepared.config.name, runtime, workers, debug=debug)
    study = load_study(prepared.record, runtime)
    try:
        while any(p.poll() is None for p in processes):
            update(study)
            time.sleep(1.0)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
    update(study)
    failed = [p.returncode for p in processes if p.returncode]
    if failed:
        raise SearchError(f"{len(failed)} of {workers} workers failed (exit {failed}); see their output above")


def _spawn_workers(name: str, runtime: Runtime, workers: int, *, debug: bool) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ)
    env[CACHE_ENV] = str(runtime.cache_dir)
    if runtime.profile_dirs:
        env[PROFILES_ENV] = os.pathsep.join(str(d) for d in runtime.profile_dirs)
    return [
        subprocess.Popen(
            # --debug carries over so that a worker's own traceback is shown, not only the parent's.
            [sys.executable, "-m", "search", *(["--debug"] if debug else []), "search", "worker",
             name, "--db", runtime.db_url, "--worker-index", str(index),
             *(["--device", runtime.device] if runtime.device else [])],
            env=env,
        )
        for index in range(workers)
    ]
