"""One trial, end to end: the one place where the stages are chained.

plan -> prune -> recover -> error -> ONNX -> latency per target -> reward -> Optuna trial.
With trial pruning the ONNX export and the latency come before recovery, and a trial whose reward
before fine-tuning is below the median is stored PRUNED there (``SearchConfig.trial_pruning``).
A stage that raises a known error (``SearchError``, ``LatencyError``) fails the trial with its
stage and reason stored as user attributes; the search goes on. Anything else is a bug: the trial
is recorded the same way and the exception propagates.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from latency_models import LatencyError, Meter
from latency_models.meter import Pending, TargetLatency
from latency_models.predictors import ArchitectureFeatures
from search.config import SearchConfig
from search.errors import SearchError
from search.pipeline.bundle import ModelBundle, seeded_error
from search.pipeline.features import architecture_features
from search.pipeline.onnx_export import OnnxArtifact, export_onnx
from search.pipeline.pruning import PrunedModel
from search.pipeline.recovery import RecoveryConfig, recover_with_report, recovery_for
from search.pipeline.space import SearchSpace, apply
from search.storage import Repository
from search.study.reward import reward
from search.study.screening import MEASURED, PREDICTED, SCREENED_ATTR, Screening

logger = logging.getLogger(__name__)

CONSTRAINTS_KEY = "constraints"

KNOWN_ERRORS = (SearchError, LatencyError)


@dataclass(frozen=True)
class SearchContext:
    """Everything a trial needs, built once per worker."""

    config: SearchConfig
    bundle: ModelBundle
    space: SearchSpace
    meters: Sequence[Meter]
    repo: Repository
    artifact_dir: Path
    batch_size: int
    base_error: float
    base_signature: str
    error_floor: float = 0.0
    screening: Screening | None = None  # None: every latency measured

    @property
    def recovery(self) -> RecoveryConfig:
        return recovery_for(self.config)


class TrialFailed(SearchError):
    """Raised after a trial's failure has been recorded; Optuna stores the trial as FAIL."""


@contextmanager
def _stage(trial: optuna.Trial, name: str, times: dict[str, float]) -> Iterator[None]:
    """Time a stage into ``times``; a failure records the stage, its reason and traceback."""
    started = time.perf_counter()
    try:
        yield
    except optuna.TrialPruned:
        raise  # not a failure: the trial loop stores it PRUNED
    except KNOWN_ERRORS as exc:
        _record_failure(trial, name, exc, times)
        logger.warning("Trial %d failed at %s, params %s: %s", trial.number, name, trial.params, exc)
        raise TrialFailed(f"trial {trial.number} failed at {name}: {exc}") from exc
    except Exception as exc:
        # A bug in the pruner, the exporter or the user's code fails this trial only: the search
        # loop stores it FAIL and goes on, and stops after several failures in a row.
        _record_failure(trial, name, exc, times)
        logger.warning("Trial %d failed at %s with an unexpected %s, params %s: %s", trial.number, name,
                       type(exc).__name__, trial.params, exc)
        raise
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - started


def _record_failure(trial: optuna.Trial, stage: str, exc: BaseException, times: dict[str, float]) -> None:
    trial.set_user_attr("fail_stage", stage)
    trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:2000])
    trial.set_user_attr("fail_traceback", traceback.format_exc()[-4000:])
    trial.set_user_attr("stage_s", dict(times))


@dataclass(frozen=True)
class Measured:
    """A trial's latency per target, where each figure came from, and the exported artifact."""

    latencies: dict[str, TargetLatency]
    sources: dict[str, str]
    artifact_sha256: str
    features: ArchitectureFeatures | None = None
    screened: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)


def run_trial(trial: optuna.Trial, ctx: SearchContext) -> float | list[float]:
    """Evaluate one plan. Returns the reward, or (error, latency per target) for ``pareto``.

    With trial pruning the latency is measured before recovery (it is a function of the
    architecture, which recovery does not change), so that a trial whose reward before
    fine-tuning is hopeless is stopped there; it raises ``optuna.TrialPruned`` with its latency
    and its held-out error stored.
    """
    times: dict[str, float] = {}
    with _stage(trial, "suggest", times):
        plan = ctx.space.suggest(trial)
        trial.set_user_attr("plan", plan.to_dict())
    with _stage(trial, "prune", times):
        pruned = apply(ctx.bundle.model, ctx.bundle.example_input, ctx.space, plan,
                       importance=ctx.config.importance, nm_criterion=ctx.config.nm_criterion,
                       calibration=ctx.bundle.train_loader)
        if pruned.warnings:
            trial.set_user_attr("pruning_warnings", list(pruned.warnings))
    # The dense plan is the base model itself: trial 0, the reference of every figure.
    is_base = pruned.signature == ctx.base_signature
    if ctx.screening is not None and not is_base:
        _screen_budget(trial, ctx.screening, ctx, pruned, times)
    measured: Measured | None = None
    if ctx.config.trial_pruning != "none":
        measured = _export_and_measure(trial, ctx, pruned, None, times)
    try:
        with _stage(trial, "recover", times):
            if not is_base:
                check = None if measured is None else _pruning_check(trial, ctx, measured, pruned)
                report = recover_with_report(pruned.model, ctx.bundle, ctx.recovery, masks=pruned.masks,
                                             before_finetune=check)
                trial.set_user_attr("recovery", report.to_dict())
    except optuna.TrialPruned:
        trial.set_user_attr("stage_s", times)
        raise
    with _stage(trial, "evaluate", times):
        error = ctx.base_error if is_base else seeded_error(ctx.bundle, pruned.model, ctx.config.seed)
    extra: dict[str, Any] = {}
    if measured is None:
        measured = _export_and_measure(trial, ctx, pruned, error, times)
    elif not is_base:
        # The measured file holds the weights before recovery. The recovered model is exported and
        # stored too: its sha256 is what `export` must reproduce (search.study.materialize).
        recovered = _export(trial, ctx, pruned, times)
        recovered.path.unlink(missing_ok=True)
        extra = {"artifact_sha256": recovered.sha256, "measured_sha256": measured.artifact_sha256}
    latencies = measured.latencies
    primary = latencies[ctx.config.targets[0]]
    with _stage(trial, "reward", times):
        score = _reward(ctx, error, primary.latency_us)
    attrs: dict[str, Any] = {
        "error": error,
        "accuracy": 1.0 - error,
        "reward": score,
        **_latency_attrs(measured, pruned),
        **extra,
        "stage_s": times,
    }
    if measured.features is not None:
        # The predictor's training data: shared by every worker through the study.
        attrs["features"] = measured.features.to_dict()
        attrs["screening"] = measured.screened
        attrs["latency_reason"] = measured.rules  # the deciding rule per target (screening.REASONS)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    _set_constraints(trial, ctx, error, primary.latency_us)
    if ctx.config.objective == "pareto":
        return [error, *(latencies[name].latency_us for name in ctx.config.targets)]
    return score


def _screen_budget(trial: optuna.Trial, screening: Screening, ctx: SearchContext, pruned: PrunedModel,
                   times: dict[str, float]) -> None:
    """Budget-aware proposals: a plan predicted far outside the budget is pruned untried."""
    if screening.budget_band is None:
        return
    with _stage(trial, "budget-screen", times):
        features = architecture_features(pruned.model, ctx.bundle.example_input, pruned.patterns)
        reason = screening.outside_budget(trial, features)
    if reason is not None:
        trial.set_user_attr(SCREENED_ATTR, reason)
        trial.set_user_attr("stage_s", times)
        logger.info("Trial %d not tried: %s", trial.number, reason)
        raise optuna.TrialPruned(reason)


def _export(trial: optuna.Trial, ctx: SearchContext, pruned: PrunedModel,
            times: dict[str, float]) -> OnnxArtifact:
    """Export the model to ONNX into the artifact store (the hub serves remote jobs from it; the
    database gets its name). The returned file is the worker's copy, for the caller to remove."""
    with _stage(trial, "export", times):
        artifact = export_onnx(pruned.model, ctx.bundle.example_input, ctx.artifact_dir,
                               batch_size=ctx.batch_size)
        ctx.repo.put_artifact_file(artifact.path, artifact.sha256)
    return artifact


def _export_and_measure(trial: optuna.Trial, ctx: SearchContext, pruned: PrunedModel, error: float | None,
                        times: dict[str, float]) -> Measured:
    """Export the model to ONNX and time it on every target (``error`` feeds screening; None
    before recovery, where screening is not used)."""
    artifact = _export(trial, ctx, pruned, times)
    features = None
    if ctx.screening is not None:
        with _stage(trial, "features", times):
            features = architecture_features(pruned.model, ctx.bundle.example_input, pruned.patterns)
    latencies = {}
    sources: dict[str, str] = {}
    screened: dict[str, str] = {}
    rules: dict[str, str] = {}
    try:
        # Meters that measure in the background (remote jobs) start first, so every device works at once.
        pending = []
        for meter in sorted(ctx.meters, key=lambda m: not m.background):
            name = meter.profile.name
            with _stage(trial, f"measure:{name}", times):
                if ctx.screening is not None and features is not None and error is not None:
                    decision = ctx.screening.decide(trial, name, features, pruned.signature, error)
                    screened[name] = decision.reason
                    rules[name] = decision.rule
                    if not decision.measure and decision.prediction is not None:
                        pending.append((name, _predicted(meter, decision.prediction.ratio,
                                                         (decision.prediction.low, decision.prediction.high))))
                        sources[name] = PREDICTED
                        continue
                pending.append((name, meter.start(artifact.path, artifact.sha256, pruned.signature)))
                sources[name] = MEASURED
        for name, waiting in pending:
            with _stage(trial, f"measure:{name}", times):
                latencies[name] = waiting.result()
    finally:
        artifact.path.unlink(missing_ok=True)  # the worker's copy; the store keeps its own
    return Measured(latencies, sources, artifact.sha256, features, screened, rules)


def _latency_attrs(measured: Measured, pruned: PrunedModel) -> dict[str, Any]:
    return {
        "latency_us": {name: t.latency_us for name, t in measured.latencies.items()},
        "latency": {name: t.to_dict() | {"source": measured.sources[name]}
                    for name, t in measured.latencies.items()},
        "latency_source": measured.sources,
        "macs": pruned.macs,
        "params": pruned.params,
        "kept": dict(pruned.kept),
        "signature": pruned.signature,
        "artifact_sha256": measured.artifact_sha256,
    }


def _reward(ctx: SearchContext, error: float, latency_us: float) -> float:
    return reward(error, latency_us, error_floor=ctx.error_floor,
                  resource_constrained=ctx.config.constraints.has_latency_budget)


def _pruning_check(trial: optuna.Trial, ctx: SearchContext, measured: Measured,
                   pruned: PrunedModel) -> Callable[[float], None]:
    """Called by recovery before fine-tuning: report the reward on the held-out error so far as
    step 0, and stop the trial if Optuna's pruner finds it below the others'."""
    latency_us = measured.latencies[ctx.config.targets[0]].latency_us

    def check(holdout_error: float) -> None:
        value = _reward(ctx, holdout_error, latency_us)
        trial.report(value, step=0)
        if trial.should_prune():
            trial.set_user_attr("pruned", {"stage": "before fine-tuning", "holdout_error": holdout_error,
                                           "reward": value})
            for key, attr in _latency_attrs(measured, pruned).items():
                trial.set_user_attr(key, attr)
            message = (f"trial {trial.number}: reward {value:.4f} before fine-tuning is below the completed "
                       "trials' median")
            logger.info("pruned %s", message)
            raise optuna.TrialPruned(message)

    return check


def _predicted(meter: Meter, ratio: float, interval: tuple[float, float]) -> Pending:
    latency = TargetLatency(meter.profile.name, ratio * meter.base_median_us, ratio, interval,
                            ratio * meter.base_median_us, cached=False)
    return Pending(lambda: latency)


def _set_constraints(trial: optuna.Trial, ctx: SearchContext, error: float, latency_us: float) -> None:
    # Optuna's samplers read these (<= 0 is feasible); they are limits, not reward penalties.
    limits = ctx.config.constraints
    base_latency = ctx.meters[0].base_median_us
    values: dict[str, float] = {}
    if limits.latency_budget_us is not None:
        values["latency_budget_us"] = latency_us - limits.latency_budget_us
    if limits.latency_budget_ratio is not None:
        values["latency_budget_ratio"] = latency_us / base_latency - limits.latency_budget_ratio
    if limits.error_ceiling is not None:
        values["error_ceiling"] = error - limits.error_ceiling
    for key, value in values.items():
        trial.set_constraint(key, value)
    if values:
        # optuna-dashboard (0.21) reads the older list form, system attribute "constraints", and
        # shows "constraints: []" without it; Optuna reads that form too, as keys "0", "1", ...
        # (``constraint_values`` drops them again). The names stay readable in a user attribute.
        trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_KEY, list(values.values()))
        trial.set_user_attr("constraints", values)
