"""The ask/tell loop every worker runs: claim a trial, keep its heartbeat, tell its outcome.

Optuna's ``study.optimize`` ends the worker when a trial it ran was finished elsewhere (``Cannot
tell a COMPLETE trial``): another worker failed it as stale while this one was slow, or completed
it. Here such a trial is logged once and the worker goes on. Every other failure of a trial is
stored FAIL (the objective records its stage and reason) and the search goes on; it stops only
after ``max_consecutive_failures`` failures in a row, naming the first one. A trial the objective
prunes (``optuna.TrialPruned``) is stored PRUNED and, like a completed one, counts toward the budget.

The claim of an enqueued (WAITING) trial is made safe by the storage (see
``search.storage.study_storage``), not retried around here.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from types import TracebackType

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat  # the heartbeat protocol; Optuna does not re-export it
from optuna.trial import FrozenTrial, TrialState

from search.errors import TrialsKeepFailing
from search.storage.record import read_trial
from search.study.runtime import counted

logger = logging.getLogger(__name__)

Objective = Callable[[optuna.Trial], float | Sequence[float]]
TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


@dataclass(frozen=True, slots=True)
class LoopLimits:
    """When a worker stops: completed and pruned trials in the study, this run's time, failures in a row."""

    trials: int | None = None
    timeout_s: float | None = None
    max_consecutive_failures: int = 5


@dataclass(frozen=True, slots=True)
class LoopResult:
    """What one worker did in this run."""

    completed: int
    failed: int
    taken_over: int
    pruned: int = 0


class Heartbeat:
    """Records a trial's heartbeat every interval in a thread while the trial runs.

    A worker that dies stops beating; after the storage's grace period another worker fails the
    trial and retries its plan. Errors while recording (a busy database) are logged, not fatal:
    the next beat tries again.
    """

    def __init__(self, storage: BaseHeartbeat, trial_id: int) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        try:
            self._storage.record_heartbeat(self._trial_id)
        except Exception as exc:  # a locked or briefly unreachable database
            logger.warning("heartbeat of trial id %d not recorded: %s", self._trial_id, exc)

    def _run(self, interval: int) -> None:
        while not self._stop.wait(interval):
            self._beat()

    def __enter__(self) -> Heartbeat:
        interval = self._storage.get_heartbeat_interval()
        if interval is not None:
            self._beat()
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True,
                                            name=f"heartbeat-{self._trial_id}")
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat: experimental, wanted
        optuna.storages.fail_stale_trials(study)


def _describe_failure(trial: FrozenTrial, exc: BaseException) -> str:
    failure = read_trial(trial).failure
    if failure is None:
        return f"trial {trial.number} at unknown stage: {type(exc).__name__}: {exc}"
    return f"trial {trial.number} at {failure.stage}: {failure.reason}"


def _tell(study: optuna.Study, storage: BaseStorage, trial: optuna.Trial, values: float | Sequence[float] | None,
          *, stopped: bool) -> FrozenTrial | None:
    """Tell Optuna how a trial ended; None when another worker finished it first (it failed the
    trial as stale while this one was slow, or just before our tell, which Optuna then skipped)."""
    trial_id = trial._trial_id  # the storage key; Optuna's Trial exposes only the number
    frozen = storage.get_trial(trial_id)
    if frozen.state.is_finished():
        logger.warning("trial %d was finished by another worker (now %s); going on with the next",
                       trial.number, frozen.state.name)
        return None
    if stopped:
        told = TrialState.PRUNED
    else:
        told = TrialState.COMPLETE if values is not None else TrialState.FAIL
    try:
        if told == TrialState.COMPLETE:
            study.tell(trial, values, skip_if_finished=True)
        else:
            study.tell(trial, state=told, skip_if_finished=True)
    except UpdateFinishedTrialError:
        pass  # finished elsewhere between our check and our write: the storage refused it
    frozen = storage.get_trial(trial_id)
    if told != TrialState.FAIL and frozen.state != told:
        logger.warning("trial %d was finished by another worker while being told (now %s); going on",
                       trial.number, frozen.state.name)
        return None
    return frozen


def run_trials(
    study: optuna.Study,
    storage: BaseStorage,
    objective: Objective,
    limits: LoopLimits,
    *,
    callbacks: Sequence[TrialCallback] = (),
) -> LoopResult:
    """Run trials until the study holds ``limits.trials`` completed or pruned ones or time runs out.

    ``storage`` is the storage ``study`` was loaded with; with a heartbeat (``RDBStorage``) each
    running trial's heartbeat is recorded in a thread.

    Raises:
        TrialsKeepFailing: ``limits.max_consecutive_failures`` trials failed in a row; the
            message names the first one's stage and error. Every failed trial is stored FAIL.
    """
    started = time.monotonic()
    completed = failed = taken_over = pruned = 0
    failures_in_row: list[str] = []
    while True:
        if limits.trials is not None and counted(study) >= limits.trials:
            break
        if limits.timeout_s is not None and time.monotonic() - started >= limits.timeout_s:
            break
        _fail_stale(study)
        with warnings.catch_warnings():
            # Optuna warns that its heartbeat belongs to study.optimize; this loop runs it itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            trial = study.ask()
        trial_id = trial._trial_id  # the storage key; Optuna's Trial exposes only the number
        values: float | Sequence[float] | None = None
        error: Exception | None = None
        stopped = False
        with Heartbeat(storage, trial_id) if isinstance(storage, BaseHeartbeat) else nullcontext():
            try:
                values = objective(trial)
            except UpdateFinishedTrialError:
                error = None
                values = None
            except optuna.TrialPruned:
                stopped = True
            except Exception as exc:
                error = exc
                logger.debug("trial %d raised", trial.number, exc_info=exc)
        frozen = _tell(study, storage, trial, values if error is None else None, stopped=stopped)
        if frozen is None:
            taken_over += 1
            continue
        if frozen.state == TrialState.COMPLETE:
            completed += 1
            failures_in_row.clear()
        elif frozen.state == TrialState.PRUNED:
            pruned += 1
            failures_in_row.clear()
        elif frozen.state == TrialState.FAIL:
            failed += 1
            failures_in_row.append(_describe_failure(frozen, error or RuntimeError("no value returned")))
            logger.warning("Trial %d failed: %s", frozen.number, failures_in_row[-1])
        for callback in callbacks:
            callback(study, frozen)
        if len(failures_in_row) >= limits.max_consecutive_failures:
            raise TrialsKeepFailing(
                f"stopping: {len(failures_in_row)} trials failed in a row; the first was {failures_in_row[0]} "
                "(see `hwprune search status NAME` for failures by stage; `--debug` logs each traceback)"
            )
    return LoopResult(completed=completed, failed=failed, taken_over=taken_over, pruned=pruned)
