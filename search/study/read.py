"""A stored search read back as figures: trial points (confirmed where confirmed), and the frozen
read models ``summary``, ``trial_rows`` and ``pareto_rows`` return, which the CLI, the Python API
and the hub serialise alike (``to_dict``). No torch: the hub serves these.

Trial data comes from ``search.storage.record`` only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from search.config import SearchConfig, resolve_error_floor
from search.errors import ConfigError
from search.storage import SearchRecord
from search.storage.record import (
    Confirmation,
    TrialRecord,
    read_base_now,
    read_confirmations,
    read_final_scores,
    read_trial,
    read_trials,
)
from search.study.pareto import TrialPoint, pareto_front
from search.study.reward import reward


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a stored non-finite figure is sent as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class _ReadModel:
    """A frozen read model: ``to_dict`` is the one JSON shape the CLI, the API and the hub send."""

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True, slots=True)
class FailureCount(_ReadModel):
    count: int
    first_trial: int
    first_reason: str


@dataclass(frozen=True, slots=True)
class SearchSummary(_ReadModel):
    """Counts by state, failures by stage, stage times, the best trial and the base figures."""

    name: str
    targets: list[str]
    objective: str
    sampler: str
    trials_asked: int | None
    trials: dict[str, int]
    completed: int
    feasible: int
    infeasible: int
    infeasible_by_constraint: dict[str, int]
    constraints: dict[str, float]
    failures_by_stage: dict[str, FailureCount]
    stage_median_s: dict[str, float]
    best_reward: float | None
    best_trial: int | None
    best_is_base: bool
    error_floor: float
    confirmed_trials: int
    base_error: float
    base_latency_us: dict[str, float]
    created_at: str


@dataclass(frozen=True, slots=True)
class ParetoRow(_ReadModel):
    """One trial of a front with speedups and accuracy change against the base model.

    ``final_*`` are None before the final recovery."""

    trial: int
    error: float
    accuracy: float
    accuracy_change: float
    latency_us: dict[str, float]
    base_latency_us: dict[str, float]
    ratio: dict[str, float]
    speedup: dict[str, float]
    speedup_interval: dict[str, list[float | None]]
    confirmed: dict[str, bool]
    macs: int
    params: int
    reward: float | None
    final_error: float | None
    final_accuracy: float | None
    final_steps: int | None
    # Every trial that reached this architecture with these figures (the first is shown).
    trials: list[int]
    # What ``error`` measures, and what ``accuracy`` (1 - error) is (None: no figure of its own).
    error_name: str = "error"
    score_name: str | None = None


@dataclass(frozen=True, slots=True)
class TrialFigures(_ReadModel):
    """A completed trial's figures as shown (confirmed where confirmed)."""

    error: float
    accuracy: float
    reward: float | None
    latency_us: dict[str, float]
    speedup: dict[str, float]
    confirmed: dict[str, bool]
    macs: int
    params: int
    feasible: bool
    constraints: dict[str, float]
    violated: list[str]


@dataclass(frozen=True, slots=True)
class TrialRow(_ReadModel):
    """One trial of a search: state, plan, figures (completed), why it failed (failed), where it
    was stopped and its latency measured first (pruned)."""

    trial: int
    state: str
    base: bool
    started: str | None
    seconds: float | None
    plan: dict[str, Any] | None
    kept: dict[str, int] | None
    figures: TrialFigures | None = None
    fail_stage: str | None = None
    fail_reason: str | None = None
    pruned: dict[str, Any] | None = None
    pruned_latency_us: dict[str, float] | None = None
    pruned_speedup: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The trial's fields, flat: a part the trial does not have is left out, not null."""
        row: dict[str, Any] = {"trial": self.trial, "state": self.state, "base": self.base,
                               "started": self.started, "seconds": self.seconds, "plan": self.plan,
                               "kept": self.kept}
        if self.figures is not None:
            row |= self.figures.to_dict()
        if self.state == "fail":
            row |= {"fail_stage": self.fail_stage, "fail_reason": self.fail_reason}
        if self.pruned is not None:
            row |= {"pruned": self.pruned, "latency_us": self.pruned_latency_us, "speedup": self.pruned_speedup}
        return _finite(row)  # type: ignore[no-any-return]


def error_floor_of(record: SearchRecord) -> float:
    """The reward's error floor as resolved when the search was created."""
    if record.base.error_floor is not None:
        return record.base.error_floor
    return resolve_error_floor(record.config, record.base.error)


def base_latency_us(record: SearchRecord, study: optuna.Study) -> dict[str, float]:
    """The base model's latency per target: as re-measured at the last confirmation, else as
    measured when the search was created."""
    now = read_base_now(study)
    return {target: now.get(target, us) for target, us in record.base.latency_us.items()}


def _point(trial: TrialRecord, confirmations: Mapping[tuple[str, str], Confirmation],
           base_now: Mapping[str, float], record: SearchRecord | None) -> TrialPoint:
    latency_us = dict(trial.latency_us)
    ratios: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    confirmed: dict[str, bool] = {}
    base_signature = record.base.signature if record is not None else None
    for target, figure in trial.latency.items():
        verdict = confirmations.get((target, trial.signature))
        if trial.signature == base_signature:  # the reference itself: 1 by definition
            ratios[target], intervals[target], confirmed[target] = 1.0, (1.0, 1.0), True
        elif verdict is not None:
            ratios[target], intervals[target], confirmed[target] = verdict.ratio, verdict.interval, True
        else:
            ratios[target], intervals[target], confirmed[target] = figure.ratio, figure.ratio_ci, False
        if target in base_now:
            latency_us[target] = ratios[target] * base_now[target]
    constraints = dict(trial.constraints)
    if record is not None:
        _constraints_on_shown_figures(constraints, record.config, ratios, latency_us)
    return TrialPoint(
        trial=trial.number, error=float(trial.error or 0.0), latency_us=latency_us, macs=trial.macs,
        params=trial.params_count, reward=trial.reward, feasible=all(v <= 0 for v in constraints.values()),
        plan=trial.plan or {}, signature=trial.signature, artifact_sha256=trial.artifact_sha256, ratio=ratios,
        ratio_interval=intervals, confirmed=confirmed,
        first_session={target: figure.session for target, figure in trial.latency.items()},
        stage_s=dict(trial.stage_s), constraints=constraints, kept=dict(trial.kept),
        predicted={target: trial.predicted(target) for target in trial.latency},
        model_device=trial.model_device,
    )


def trial_points(study: optuna.Study, record: SearchRecord | None = None) -> list[TrialPoint]:
    """Every completed trial with its figures; with ``record``, latencies are confirmed ratios
    where confirmed (else first sessions) times the base model's current latency."""
    confirmations = read_confirmations(study) if record is not None else {}
    base_now = base_latency_us(record, study) if record is not None else {}
    return [_point(trial, confirmations, base_now, record)
            for trial in read_trials(study, ["COMPLETE"]) if trial.has_figures]


def shown_front(points: list[TrialPoint], target: str) -> list[TrialPoint]:
    """The front a user is shown on ``target``, by latency: the front of confirmed figures, plus
    the unconfirmed *measured* trials that the mixed front would hold (marked unconfirmed where
    shown: an unconfirmed, possibly lucky, figure never hides a confirmed trial). A predicted
    figure that was never confirmed is not shown at all: nothing on a front is a prediction (its
    confirmation failed or has not run; `hwprune search confirm` measures it)."""
    shown = {p.trial: p for p in pareto_front([p for p in points if p.confirmed.get(target)], target)}
    shown.update({p.trial: p for p in pareto_front(points, target)
                  if not p.confirmed.get(target) and not p.predicted.get(target)})
    return sorted(shown.values(), key=lambda p: (p.latency_us[target], p.error))


def _constraints_on_shown_figures(constraints: dict[str, float], config: SearchConfig,
                                  ratios: dict[str, float], latency_us: dict[str, float]) -> None:
    # A latency budget is judged on the figure shown (confirmed where confirmed), not only on the
    # first session the sampler saw.
    limits = config.constraints
    primary = config.targets[0]
    if primary not in ratios:
        return
    if limits.latency_budget_ratio is not None:
        constraints["latency_budget_ratio"] = ratios[primary] - limits.latency_budget_ratio
    if limits.latency_budget_us is not None:
        constraints["latency_budget_us"] = latency_us[primary] - limits.latency_budget_us


def _failures(trials: list[TrialRecord]) -> dict[str, FailureCount]:
    failures: dict[str, FailureCount] = {}
    for trial in trials:
        if trial.state != "FAIL":
            continue
        stage = trial.failure.stage if trial.failure is not None else "unknown"
        first = failures.get(stage)
        failures[stage] = (FailureCount(1, trial.number, trial.failure.reason if trial.failure else "")
                           if first is None else FailureCount(first.count + 1, first.first_trial, first.first_reason))
    return failures


def _stage_medians(points: list[TrialPoint], study: optuna.Study) -> dict[str, float]:
    stage_times: dict[str, list[float]] = {}
    for point in points:
        for stage, seconds in point.stage_s.items():
            stage_times.setdefault(stage, []).append(seconds)
    for (target, _signature), verdict in read_confirmations(study).items():
        stage_times.setdefault(f"confirm:{target}", []).append(verdict.elapsed_s)
    return {stage: statistics.median(values) for stage, values in sorted(stage_times.items())}


def summary(record: SearchRecord, study: optuna.Study) -> SearchSummary:
    """Counts by state, failures by stage, stage times, the best trial and the base figures."""
    trials = read_trials(study)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state] = states.get(trial.state, 0) + 1
    points = trial_points(study, record)
    feasible = [p for p in points if p.reward is not None and p.feasible]
    # The best trial by the reward on the figures shown (confirmed where confirmed): a trial that
    # led on a lucky first session must not be named best beside a front it is not on.
    scored = [(shown_reward(p, record), p) for p in feasible]
    best_reward, best = max(scored, key=lambda pair: pair[0]) if scored else (None, None)
    config = record.config
    return SearchSummary(
        name=record.name, targets=list(config.targets), objective=config.objective, sampler=config.sampler,
        trials_asked=config.trials, trials=states, completed=states.get("COMPLETE", 0),
        feasible=sum(p.feasible for p in points), infeasible=sum(not p.feasible for p in points),
        infeasible_by_constraint=infeasible_by_constraint(points),
        constraints={k: v for k, v in config.constraints.model_dump().items() if v is not None},
        failures_by_stage=_failures(trials), stage_median_s=_stage_medians(points, study),
        best_reward=best_reward, best_trial=best.trial if best is not None else None,
        best_is_base=best is not None and best.signature == record.base.signature,
        error_floor=error_floor_of(record),
        confirmed_trials=sum(all(p.confirmed.values()) for p in points if p.confirmed),
        base_error=record.base.error, base_latency_us=base_latency_us(record, study),
        created_at=record.created_at.isoformat(),
    )


def infeasible_by_constraint(points: list[TrialPoint]) -> dict[str, int]:
    """How many completed trials break each constraint (a trial may break several)."""
    counts: dict[str, int] = {}
    for point in points:
        for name in point.violated:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def trial_seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    """How long a finished trial ran (None while it runs or if it never started)."""
    return read_trial(trial).seconds


def _speedup(base_latency: Mapping[str, float], latency_us: Mapping[str, float]) -> dict[str, float]:
    return {k: base_latency[k] / v for k, v in latency_us.items() if v > 0 and k in base_latency}


def _figures(point: TrialPoint, base_latency: Mapping[str, float]) -> TrialFigures:
    return TrialFigures(error=point.error, accuracy=point.accuracy, reward=point.reward,
                        latency_us=dict(point.latency_us), speedup=_speedup(base_latency, point.latency_us),
                        confirmed=dict(point.confirmed), macs=point.macs, params=point.params,
                        feasible=point.feasible, constraints=dict(point.constraints), violated=point.violated)


def trial_rows(record: SearchRecord, study: optuna.Study) -> list[TrialRow]:
    """Every trial of a search: state, plan as kept channel counts, figures as shown (confirmed
    where confirmed), constraint values and feasibility, why a failed trial failed and where a
    pruned one was stopped."""
    points = {p.trial: p for p in trial_points(study, record)}
    base_latency = base_latency_us(record, study)
    rows = []
    for trial in read_trials(study):
        point = points.get(trial.number)
        stopped = trial.early_stop if trial.state == "PRUNED" else None
        rows.append(TrialRow(
            trial=trial.number, state=trial.state.lower(),
            base=trial.signature == record.base.signature or trial.enqueued_as_base,
            started=trial.started.isoformat() if trial.started else None, seconds=trial.seconds,
            plan=None if trial.plan is None else dict(trial.plan), kept=dict(trial.kept) if trial.kept else None,
            figures=None if point is None else _figures(point, base_latency),
            fail_stage=trial.failure.stage if trial.failure else None,
            fail_reason=trial.failure.reason if trial.failure else None,
            # Stopped before fine-tuning: its latency (measured first) and why it was stopped.
            pruned=None if stopped is None else stopped.to_dict(),
            pruned_latency_us=None if stopped is None else trial.latency_us,
            pruned_speedup=None if stopped is None else _speedup(base_latency, trial.latency_us),
        ))
    return rows


def shown_reward(point: TrialPoint, record: SearchRecord) -> float:
    """The reward of ``point`` on the primary target's figure as shown (confirmed where confirmed)."""
    config = record.config
    latency = point.latency_us[config.targets[0]]
    return reward(point.error, latency, error_floor=error_floor_of(record),
                  resource_constrained=config.constraints.has_latency_budget)


def best_is_base_warning(info: SearchSummary, config: SearchConfig) -> str | None:
    """A warning when the search's best trial is the dense base model, naming the flags to change."""
    if not info.best_is_base or config.objective != "reward" or info.completed < 2:
        return None
    return (
        f"the best trial is the dense base model (error {info.base_error:.4g}): no pruned plan scored a "
        f"higher reward with error floor {info.error_floor:.4g}. Raise --error-floor to accept more error "
        "for speed, give --latency-budget-ratio R (AMC's resource-constrained mode: the most accurate plan "
        "within R x the base latency wins), or use --objective pareto to see the whole trade-off"
    )


def check_target(record: SearchRecord, target: str | None) -> str:
    """``target``, or the search's primary one; refused when it is not one of the search's."""
    chosen = target or record.config.targets[0]
    if chosen not in record.config.targets:
        raise ConfigError(f"target {chosen!r} is not one of this search's: {', '.join(record.config.targets)}")
    return chosen


def pareto_rows(record: SearchRecord, study: optuna.Study, target: str) -> list[ParetoRow]:
    """The Pareto front on ``target`` as rows with speedups and accuracy change against the base.

    Latencies are confirmed figures where the trial was confirmed (``confirmed`` says which),
    times the base model's latency as last measured; ``speedup_interval`` is the range a
    re-measurement is expected in.
    """
    check_target(record, target)
    base_latency = base_latency_us(record, study)
    finals = read_final_scores(study)
    rows = []
    for point in shown_front(trial_points(study, record), target):
        final = finals.get(point.trial)
        rows.append(ParetoRow(
            trial=point.trial, error=point.error, accuracy=point.accuracy,
            accuracy_change=record.base.error - point.error, latency_us=dict(point.latency_us),
            base_latency_us=dict(base_latency), ratio=dict(point.ratio),
            speedup={k: base_latency[k] / v for k, v in point.latency_us.items() if v > 0},
            speedup_interval={k: [1 / high, 1 / low if low > 0 else None]
                              for k, (low, high) in point.ratio_interval.items() if high > 0},
            confirmed=dict(point.confirmed), macs=point.macs, params=point.params, reward=point.reward,
            # After the final recovery: the long-recovery figure beside ``error``.
            final_error=final.error if final else None, final_accuracy=1.0 - final.error if final else None,
            final_steps=final.steps if final else None,
            # Every trial that reached this architecture with these figures (the first shown).
            trials=[point.trial, *point.same_as],
            error_name=record.base.error_name, score_name=record.base.score_name,
        ))
    return rows
