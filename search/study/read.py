"""A stored search read back as figures: trial points (confirmed where confirmed), the summary
that ``search status`` prints, the Pareto rows. No torch: the hub serves these."""

from __future__ import annotations

import statistics
from typing import Any

import optuna
from optuna.trial import TrialState

from search.config import SearchConfig, resolve_error_floor
from search.errors import ConfigError
from search.storage import SearchRecord
from search.study import confirmation
from search.study.pareto import TrialPoint, pareto_front
from search.study.reward import reward

# Study user attribute prefix of the final recovery's scores (``search.study.final_recovery``).
FINAL_PREFIX = "final:"


def error_floor_of(record: SearchRecord) -> float:
    """The reward's error floor as resolved when the search was created."""
    if "error_floor" in record.base:
        return float(record.base["error_floor"])
    return resolve_error_floor(SearchConfig.from_stored(record.config), record.base["error"])


def base_latency_us(record: SearchRecord, study: optuna.Study) -> dict[str, float]:
    """The base model's latency per target: as re-measured at the last confirmation, else as
    measured when the search was created."""
    now = study.user_attrs.get(confirmation.BASE_NOW_KEY, {})
    return {target: float(now.get(target, m["median_us"])) for target, m in record.base["measurements"].items()}


def trial_points(study: optuna.Study, record: SearchRecord | None = None) -> list[TrialPoint]:
    """Every completed trial with its figures; with ``record``, latencies are confirmed ratios
    where confirmed (else first sessions) times the base model's current latency."""
    confirmations = confirmation.stored(study.user_attrs) if record is not None else {}
    base_now = base_latency_us(record, study) if record is not None else {}
    base_signature = record.base["signature"] if record is not None else None
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if "error" not in attrs:
            continue
        signature = str(attrs.get("signature", ""))
        latency_us = dict(attrs.get("latency_us", {}))
        ratios: dict[str, float] = {}
        intervals: dict[str, tuple[float, float]] = {}
        confirmed: dict[str, bool] = {}
        first: dict[str, confirmation.Session] = {}
        for target, figures in attrs.get("latency", {}).items():
            first[target] = confirmation.Session.from_dict(figures)
            verdict = confirmations.get((target, signature))
            if signature == base_signature:  # the reference itself: 1 by definition
                ratios[target], intervals[target], confirmed[target] = 1.0, (1.0, 1.0), True
            elif verdict is not None:
                ratios[target], intervals[target], confirmed[target] = verdict.ratio, verdict.interval, True
            else:
                ratios[target], intervals[target] = first[target].ratio, first[target].ratio_ci
                confirmed[target] = False
            if target in base_now:
                latency_us[target] = ratios[target] * base_now[target]
        constraints = constraint_values(trial)
        if record is not None:
            _constraints_on_shown_figures(constraints, record, ratios, latency_us)
        points.append(
            TrialPoint(
                trial=trial.number,
                error=float(attrs["error"]),
                latency_us=latency_us,
                macs=int(attrs.get("macs", 0)),
                params=int(attrs.get("params", 0)),
                reward=attrs.get("reward"),
                feasible=all(v <= 0 for v in constraints.values()),
                plan=attrs.get("plan", {}),
                signature=signature,
                artifact_sha256=str(attrs.get("artifact_sha256", "")),
                ratio=ratios,
                ratio_interval=intervals,
                confirmed=confirmed,
                first_session=first,
                stage_s=dict(attrs.get("stage_s", {})),
                constraints=constraints,
                kept={str(k): int(v) for k, v in dict(attrs.get("kept", {})).items()},
                predicted={t: s == "predicted" for t, s in attrs.get("latency_source", {}).items()},
            )
        )
    return points


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


def constraint_values(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    """A trial's constraint values by name (<= 0 feasible); the unnamed copies Optuna reads back
    from the list form kept for optuna-dashboard ("0", "1", ...) are left out."""
    return {k: float(v) for k, v in trial.constraints.items() if not k.isdigit()}


def _constraints_on_shown_figures(constraints: dict[str, float], record: SearchRecord,
                                  ratios: dict[str, float], latency_us: dict[str, float]) -> None:
    # A latency budget is judged on the figure shown (confirmed where confirmed), not only on the
    # first session the sampler saw.
    limits = record.config.get("constraints", {})
    primary = record.config["targets"][0]
    if primary not in ratios:
        return
    if limits.get("latency_budget_ratio") is not None:
        constraints["latency_budget_ratio"] = ratios[primary] - limits["latency_budget_ratio"]
    if limits.get("latency_budget_us") is not None:
        constraints["latency_budget_us"] = latency_us[primary] - limits["latency_budget_us"]


def summary(record: SearchRecord, study: optuna.Study) -> dict[str, Any]:
    """Counts by state, failures by stage, stage times, the best trial and the base figures."""
    states: dict[str, int] = {}
    failures: dict[str, dict[str, Any]] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
        if trial.state == TrialState.FAIL:
            stage = str(trial.user_attrs.get("fail_stage", "unknown"))
            entry = failures.setdefault(stage, {"count": 0, "first_trial": trial.number,
                                                "first_reason": trial.user_attrs.get("fail_reason", "")})
            entry["count"] += 1
    points = trial_points(study, record)
    feasible = [p for p in points if p.reward is not None and p.feasible]
    # The best trial by the reward on the figures shown (confirmed where confirmed): a trial that
    # led on a lucky first session must not be named best beside a front it is not on.
    scored = [(shown_reward(p, record), p) for p in feasible]
    best_reward, best = max(scored, key=lambda pair: pair[0]) if scored else (None, None)
    stage_times: dict[str, list[float]] = {}
    for point in points:
        for stage, seconds in point.stage_s.items():
            stage_times.setdefault(stage, []).append(seconds)
    for (target, _signature), verdict in confirmation.stored(study.user_attrs).items():
        stage_times.setdefault(f"confirm:{target}", []).append(verdict.elapsed_s)
    confirmed = sum(all(p.confirmed.values()) for p in points if p.confirmed)
    return {
        "name": record.name,
        "targets": record.config["targets"],
        "objective": record.config["objective"],
        "sampler": record.config["sampler"],
        "trials_asked": record.config["trials"],
        "trials": states,
        "completed": states.get("COMPLETE", 0),
        "feasible": sum(p.feasible for p in points),
        "infeasible": sum(not p.feasible for p in points),
        "infeasible_by_constraint": infeasible_by_constraint(points),
        "constraints": {k: v for k, v in record.config.get("constraints", {}).items() if v is not None},
        "failures_by_stage": failures,
        "stage_median_s": {stage: statistics.median(values) for stage, values in sorted(stage_times.items())},
        "best_reward": best_reward,
        "best_trial": best.trial if best is not None else None,
        "best_is_base": best is not None and best.signature == record.base["signature"],
        "error_floor": error_floor_of(record),
        "confirmed_trials": confirmed,
        "base_error": record.base["error"],
        "base_latency_us": base_latency_us(record, study),
        "created_at": record.created_at.isoformat(),
    }


def infeasible_by_constraint(points: list[TrialPoint]) -> dict[str, int]:
    """How many completed trials break each constraint (a trial may break several)."""
    counts: dict[str, int] = {}
    for point in points:
        for name in point.violated:
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def trial_seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    """How long a finished trial ran (None while it runs or if it never started)."""
    if trial.datetime_complete is None or trial.datetime_start is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def trial_rows(record: SearchRecord, study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial of a search as plain data: state, plan as kept channel counts, figures as shown
    (confirmed where confirmed), constraint values and feasibility, why a failed trial failed and
    where a pruned one was stopped."""
    points = {p.trial: p for p in trial_points(study, record)}
    base_latency = base_latency_us(record, study)
    base_signature = record.base["signature"]
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        row: dict[str, Any] = {
            "trial": trial.number,
            "state": trial.state.name.lower(),
            "base": attrs.get("signature") == base_signature or bool(attrs.get("base")),
            "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
            "seconds": trial_seconds(trial),
            "plan": attrs.get("plan"),
            "kept": attrs.get("kept"),
        }
        point = points.get(trial.number)
        if point is not None:
            row |= {
                "error": point.error,
                "accuracy": point.accuracy,
                "reward": point.reward,
                "latency_us": dict(point.latency_us),
                "speedup": {k: base_latency[k] / v for k, v in point.latency_us.items() if v > 0 and k in base_latency},
                "confirmed": dict(point.confirmed),
                "macs": point.macs,
                "params": point.params,
                "feasible": point.feasible,
                "constraints": dict(point.constraints),
                "violated": point.violated,
            }
        if trial.state == TrialState.FAIL:
            row |= {"fail_stage": attrs.get("fail_stage"), "fail_reason": attrs.get("fail_reason")}
        if trial.state == TrialState.PRUNED and "pruned" in attrs:
            # Stopped before fine-tuning: its latency (measured first) and why it was stopped.
            latency_us = dict(attrs.get("latency_us", {}))
            row |= {"pruned": attrs["pruned"], "latency_us": latency_us,
                    "speedup": {k: base_latency[k] / v for k, v in latency_us.items() if v > 0 and k in base_latency}}
        rows.append(row)
    return rows


def shown_reward(point: TrialPoint, record: SearchRecord) -> float:
    """The reward of ``point`` on the primary target's figure as shown (confirmed where confirmed)."""
    config = SearchConfig.from_stored(record.config)
    latency = point.latency_us[config.targets[0]]
    return reward(point.error, latency, error_floor=error_floor_of(record),
                  resource_constrained=config.constraints.has_latency_budget)


def best_is_base_warning(info: dict[str, Any], config: SearchConfig) -> str | None:
    """A warning when the search's best trial is the dense base model, naming the flags to change."""
    if not info["best_is_base"] or config.objective != "reward" or info["completed"] < 2:
        return None
    return (
        f"the best trial is the dense base model (error {info['base_error']:.4g}): no pruned plan scored a "
        f"higher reward with error floor {info['error_floor']:.4g}. Raise --error-floor to accept more error "
        "for speed, give --latency-budget-ratio R (AMC's resource-constrained mode: the most accurate plan "
        "within R x the base latency wins), or use --objective pareto to see the whole trade-off"
    )


def pareto_rows(record: SearchRecord, study: optuna.Study, target: str) -> list[dict[str, Any]]:
    """The Pareto front on ``target`` as rows with speedups and accuracy change against the base.

    Latencies are confirmed figures where the trial was confirmed (``confirmed`` says which),
    times the base model's latency as last measured; ``speedup_interval`` is the range a
    re-measurement is expected in.
    """
    if target not in record.config["targets"]:
        raise ConfigError(f"target {target!r} is not one of this search's: {', '.join(record.config['targets'])}")
    base = record.base
    base_latency = base_latency_us(record, study)
    rows = []
    for point in shown_front(trial_points(study, record), target):
        final = study.user_attrs.get(f"{FINAL_PREFIX}{point.trial}")
        rows.append({
            "trial": point.trial,
            "error": point.error,
            "accuracy": point.accuracy,
            "accuracy_change": (base["error"] - point.error),
            "latency_us": dict(point.latency_us),
            "base_latency_us": base_latency,
            "ratio": dict(point.ratio),
            "speedup": {k: base_latency[k] / v for k, v in point.latency_us.items() if v > 0},
            "speedup_interval": {k: [1 / high, 1 / low if low > 0 else None]
                                 for k, (low, high) in point.ratio_interval.items() if high > 0},
            "confirmed": dict(point.confirmed),
            "macs": point.macs,
            "params": point.params,
            "reward": point.reward,
            # After the final recovery (None before it): the long-recovery figure beside ``error``.
            "final_error": final["error"] if final else None,
            "final_accuracy": 1.0 - final["error"] if final else None,
            "final_steps": final["steps"] if final else None,
            # Every trial that reached this architecture with these figures (the first shown).
            "trials": [point.trial, *point.same_as],
            # What ``error`` measures, and what ``accuracy`` (1 - error) is (None: no figure of its
            # own); a search stored before they were recorded says only "error".
            "error_name": base.get("error_name", "error"),
            "score_name": base.get("score_name"),
        })
    return rows
