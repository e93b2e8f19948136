"""One trial, end to end: the plan through the trial chain, then its latency, reward and record.

plan -> (``search.pipeline.chain``: prune -> recover -> error -> ONNX) -> latency per target ->
reward -> the trial record (``search.storage.record``). With trial pruning the ONNX export and
the latency come before recovery, and a trial whose reward before fine-tuning is below the median
is stored PRUNED there (``SearchConfig.trial_pruning``).
A stage that raises a known error (``SearchError``, ``LatencyError``) fails the trial with its
stage and reason stored in its record; the search goes on. Anything else is a bug: the trial
is recorded the same way and the exception propagates.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna

from latency_models import LatencyError, Meter
from latency_models.meter import Pending, TargetLatency
from latency_models.predictors import ArchitectureFeatures
from search.config import SearchConfig, cpu_count
from search.errors import SearchError
from search.pipeline.bundle import ModelBundle
from search.pipeline.chain import ChainSettings, export, run_chain
from search.pipeline.device import CPU, ModelDevice
from search.pipeline.features import architecture_features
from search.pipeline.onnx_export import OnnxArtifact
from search.pipeline.pruning import PrunedModel
from search.pipeline.space import SearchSpace
from search.storage import Repository
from search.storage import record as trial_record
from search.storage.record import EarlyStop, Failure, LatencySource, Outcome, TargetFigure
from search.study.reward import reward
from search.study.screening import Screening

logger = logging.getLogger(__name__)

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
    device: ModelDevice = CPU  # where recovery and scoring run

    @property
    def chain(self) -> ChainSettings:
        """How this search's trials are applied, recovered, scored and exported."""
        return ChainSettings.for_search(self.config, batch_size=self.batch_size, device=self.device)

    @property
    def model_waited_s(self) -> float:
        """Seconds model work waited for measurements on its device (the device lock)."""
        return 0.0 if self.device.lock is None else self.device.lock.waited_s


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
    trial_record.write_failure(trial, Failure(stage, f"{type(exc).__name__}: {exc}", traceback.format_exc()), times)


@dataclass(frozen=True)
class Measured:
    """A trial's latency per target, where each figure came from, and the exported artifact."""

    latencies: dict[str, TargetLatency]
    sources: dict[str, LatencySource]
    artifact_sha256: str
    features: ArchitectureFeatures | None = None
    screened: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)


def run_trial(trial: optuna.Trial, ctx: SearchContext) -> float | list[float]:
    """Evaluate one plan through the trial chain (``search.pipeline.chain``), then time it on
    every target. Returns the reward, or (error, latency per target) for ``pareto``.

    With trial pruning the latency is measured before recovery (it is a function of the
    architecture, which recovery does not change), so that a trial whose reward before
    fine-tuning is hopeless is stopped there; it raises ``optuna.TrialPruned`` with its latency
    and its held-out error stored.
    """
    times: dict[str, float] = {}
    with _stage(trial, "suggest", times):
        plan = ctx.space.suggest(trial)
        trial_record.write_plan(trial, plan.to_dict())
        trial_record.write_model_work(trial, device=ctx.device.name,
                                      threads=ctx.config.recovery.threads or cpu_count())
    early: list[Measured] = []  # with trial pruning: measured before recovery

    def on_pruned(pruned: PrunedModel) -> Callable[[float], None] | None:
        trial_record.write_pruning_warnings(trial, pruned.warnings)
        if pruned.signature != ctx.base_signature:
            _screen_budget(trial, ctx, pruned, times)
        if ctx.config.trial_pruning == "none":
            return None
        exported = export(pruned.model, ctx.bundle, ctx.chain, ctx.artifact_dir, lambda n: _stage(trial, n, times))
        early.append(_measure(trial, ctx, pruned, _stored(trial, ctx, exported, times), None, times))
        return None if pruned.signature == ctx.base_signature else _pruning_check(trial, ctx, early[0], pruned)

    waited_before = ctx.model_waited_s
    try:
        # The dense plan is the base model itself (trial 0, the reference of every figure): the
        # chain neither recovers nor scores it again.
        chained = run_chain(ctx.bundle, ctx.space, plan, ctx.chain, out=ctx.artifact_dir,
                            base_signature=ctx.base_signature, base_error=ctx.base_error,
                            stage=lambda name: _stage(trial, name, times), on_pruned=on_pruned)
    except optuna.TrialPruned:
        trial_record.write_stage_times(trial, times)
        raise
    finally:
        # Time model work spent waiting for measurements on its device (inside recover/evaluate).
        _add_wait(times, "wait:model", ctx.model_waited_s - waited_before)
    if chained.pruned is None or chained.error is None:
        raise SearchError(f"trial {trial.number}: the trial chain returned no pruned model or error")
    pruned, error = chained.pruned, chained.error
    if chained.report is not None:
        trial_record.write_recovery(trial, chained.report.to_dict())
    artifact = _stored(trial, ctx, chained.artifact, times)
    measured_sha256 = None
    if not early:
        measured = _measure(trial, ctx, pruned, artifact, error, times)
    else:
        # The measured file holds the weights before recovery. The recovered model is stored too:
        # its sha256 is what `export` must reproduce (search.study.materialize).
        artifact.path.unlink(missing_ok=True)
        measured = early[0]
        if pruned.signature != ctx.base_signature:
            measured_sha256, measured = measured.artifact_sha256, replace(measured, artifact_sha256=artifact.sha256)
    latencies = measured.latencies
    primary = latencies[ctx.config.targets[0]]
    with _stage(trial, "reward", times):
        score = _reward(ctx, error, primary.latency_us)
    trial_record.write_outcome(trial, Outcome(
        error=error, reward=score, latency=_figures(measured), macs=pruned.macs, params=pruned.params,
        kept=pruned.kept, signature=pruned.signature, artifact_sha256=measured.artifact_sha256, stage_s=times,
        measured_sha256=measured_sha256, features=measured.features, screening=measured.screened,
        latency_reason=measured.rules))  # the deciding rule per target (screening.REASONS)
    _set_constraints(trial, ctx, error, primary.latency_us)
    if ctx.config.objective == "pareto":
        return [error, *(latencies[name].latency_us for name in ctx.config.targets)]
    return score


def _stored(trial: optuna.Trial, ctx: SearchContext, artifact: OnnxArtifact | None,
            times: dict[str, float]) -> OnnxArtifact:
    """Put an exported file into the artifact store (the hub serves remote jobs from it; the
    database gets its name). The file itself is the worker's copy, for the caller to remove."""
    with _stage(trial, "export", times):
        if artifact is None:
            raise SearchError(f"trial {trial.number}: the trial chain exported no ONNX file")
        ctx.repo.put_artifact_file(artifact.path, artifact.sha256)
    return artifact


def _measure(trial: optuna.Trial, ctx: SearchContext, pruned: PrunedModel, artifact: OnnxArtifact,
             error: float | None, times: dict[str, float]) -> Measured:
    """Time an exported model on every target, then remove the worker's copy (``error`` feeds
    screening; None before recovery, where screening is not used)."""
    features = None
    if ctx.screening is not None:
        with _stage(trial, "features", times):
            features = architecture_features(pruned.model, ctx.bundle.example_input, pruned.patterns)
    latencies = {}
    sources: dict[str, LatencySource] = {}
    screened: dict[str, str] = {}
    rules: dict[str, str] = {}
    waited_before = [meter.lock_waited_s for meter in ctx.meters]
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
                        sources[name] = LatencySource.PREDICTED
                        continue
                pending.append((name, meter.start(artifact.path, artifact.sha256, pruned.signature)))
                sources[name] = LatencySource.MEASURED
        for name, waiting in pending:
            with _stage(trial, f"measure:{name}", times):
                latencies[name] = waiting.result()
        for meter, waited in zip(ctx.meters, waited_before, strict=True):
            # Part of measure:<target>: the wait for model work in flight on the same device.
            _add_wait(times, f"wait:measure:{meter.profile.name}", meter.lock_waited_s - waited)
    finally:
        artifact.path.unlink(missing_ok=True)  # the worker's copy; the store keeps its own
    return Measured(latencies, sources, artifact.sha256, features, screened, rules)


def _add_wait(times: dict[str, float], name: str, seconds: float) -> None:
    if seconds > 0:
        times[name] = times.get(name, 0.0) + seconds


def _screen_budget(trial: optuna.Trial, ctx: SearchContext, pruned: PrunedModel, times: dict[str, float]) -> None:
    """Budget-aware proposals (AMC's action clipping, the latency model in place of FLOPs): a plan
    the latency model puts far outside the budget's band is pruned untried, before recovery."""
    if ctx.screening is None or ctx.screening.budget_band is None:
        return
    with _stage(trial, "budget-screen", times):
        features = architecture_features(pruned.model, ctx.bundle.example_input, pruned.patterns)
        reason = ctx.screening.outside_budget(trial, features)
    if reason is not None:
        trial_record.write_budget_screen(trial, reason, times)
        logger.info("Trial %d not tried: %s", trial.number, reason)
        raise optuna.TrialPruned(reason)


def _figures(measured: Measured) -> dict[str, TargetFigure]:
    return {name: TargetFigure(t.latency_us, t.ratio, t.ratio_ci, t.median_us, t.cached, measured.sources[name])
            for name, t in measured.latencies.items()}


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
            trial_record.write_early_stop(
                trial, EarlyStop("before fine-tuning", holdout_error, value), _figures(measured), macs=pruned.macs,
                params=pruned.params, kept=pruned.kept, signature=pruned.signature,
                artifact_sha256=measured.artifact_sha256)
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
    trial_record.write_constraints(trial, values)
