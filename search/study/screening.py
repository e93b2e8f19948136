"""Hybrid latency: predict a trial's latency ratio where the predictor has earned it, measure
where it has not.

Per target, a trial's latency is **measured** when
* the architecture is the base model or already in the measurement cache (free), or
* fewer than ``min_measured`` trials of the search were measured on that target, or
* the predictor's held-out mean error (cross-validated on the measured trials) is above
  ``max_mape``, or
* (hybrid) the candidate's conformal interval is wider than ``+-max_rel_halfwidth``, or
* (hybrid) the trial could enter that target's Pareto front: no measured feasible trial
  dominates (error, lowest plausible ratio), or a latency budget lies inside its interval.

Otherwise the prediction is stored, marked ``predicted``. A predicted trial is dominated by a
measured one even at the optimistic end of its interval, so it cannot be on a front built from
the stored figures; if a confirmation later raises the measured trial's figure and a predicted
trial surfaces, confirmation measures it in two fresh sessions and never counts the prediction
(``search.study.controller``). Nothing on a front is a prediction.

Samples come from the study itself (every measured trial stores its features), so parallel
workers share them; the fitted model is saved to the database every ``SAVE_EVERY`` new samples,
as a new version of ``learned-<base>-<profile>``, for `hwprune latency-model eval` and for the next
search on that base model and profile. A lookup table built for that base model and profile
(`hwprune latency-model build`) competes with the learned model: the one with the lower held-out
error predicts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from latency_models import Meter
from latency_models.predictors import (
    ArchitectureFeatures,
    LatencyModel,
    LearnedModel,
    Prediction,
)
from latency_models.store import MeasurementKey
from search.config import ScreeningSettings, SearchConfig
from search.storage import Repository
from search.storage.predictor_store import LatencyModelStore

logger = logging.getLogger(__name__)

SAVE_EVERY = 10
MEASURED = "measured"
PREDICTED = "predicted"
CACHED = "cached"


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to measure one target for one trial, and why; ``prediction`` when one was made."""

    measure: bool
    reason: str
    prediction: Prediction | None = None


def model_name(kind: str, base_fingerprint: str, profile: str) -> str:
    """The shared name of a latency model for one base model and profile."""
    return f"{kind}-{base_fingerprint[:12]}-{profile}"


class TargetScreen:
    """One target's predictor, refitted from the study's measured trials."""

    def __init__(self, meter: Meter, *, mode: str, settings: ScreeningSettings, base: ArchitectureFeatures,
                 base_fingerprint: str, store: LatencyModelStore | None) -> None:
        self.meter = meter
        self.target = meter.profile.name
        self.mode = mode
        self.settings = settings
        self.base = base
        self.base_fingerprint = base_fingerprint
        self.store = store
        self.models: list[LatencyModel] = [LearnedModel(base)]
        self.seed_samples: dict[ArchitectureFeatures, float] = {}
        if store is not None:
            for stored in store.for_target(profile_fingerprint=meter.profile.fingerprint(),
                                           base_fingerprint=base_fingerprint):
                model = stored.model()
                self.seed_samples.update(dict(model.samples))
                if model.kind != LearnedModel.kind:
                    self.models.append(model)
        self._fitted_on = -1
        self._saved_at = 0
        self._features: dict[int, ArchitectureFeatures] = {}

    @property
    def active(self) -> LatencyModel:
        """The model with the lowest held-out error (the learned one until any has one)."""
        scored = [m for m in self.models if m.held_out is not None]
        return min(scored, key=lambda m: m.held_out.mape if m.held_out else math.inf) if scored else self.models[0]

    def _measured(self, trials: list[optuna.trial.FrozenTrial]) -> list[tuple[optuna.trial.FrozenTrial, float]]:
        found = []
        for trial in trials:
            attrs = trial.user_attrs
            if attrs.get("latency_source", {}).get(self.target) == PREDICTED or "features" not in attrs:
                continue
            figures = attrs.get("latency", {}).get(self.target)
            if figures is not None:
                found.append((trial, float(figures["ratio"])))
        return found

    def _refit(self, measured: list[tuple[optuna.trial.FrozenTrial, float]]) -> None:
        if len(measured) == self._fitted_on:
            return
        samples = dict(self.seed_samples)
        for trial, ratio in measured:
            features = self._features.get(trial.number)
            if features is None:
                features = ArchitectureFeatures.from_dict(trial.user_attrs["features"])
                self._features[trial.number] = features
            samples[features] = ratio
        data = [(f, r) for f, r in samples.items() if r > 0]
        for model in self.models:
            model.samples = []
            model.fit(data)
        self._fitted_on = len(measured)
        if self.store is not None and len(measured) - self._saved_at >= SAVE_EVERY:
            self._saved_at = len(measured)
            for model in self.models:
                self.store.save(model_name(model.kind, self.base_fingerprint, self.target), model,
                                profile=self.target, profile_fingerprint=self.meter.profile.fingerprint(),
                                base_fingerprint=self.base_fingerprint)

    def decide(self, trial: optuna.Trial, features: ArchitectureFeatures, signature: str, error: float,
               constraints: Mapping[str, Any]) -> Decision:
        meter = self.meter
        if signature == meter.base.signature:
            return Decision(True, "base model")
        if meter.store.find_measurement(MeasurementKey(signature, meter.profile.fingerprint(), meter.base.sha256)):
            return Decision(True, "cached")
        trials = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        measured = self._measured(trials)
        if len(measured) < self.settings.min_measured:
            return Decision(True, f"{len(measured)} of {self.settings.min_measured} measured trials")
        self._refit(measured)
        model = self.active
        held = model.held_out
        if held is None or held.mape > self.settings.max_mape:
            mape = "none" if held is None else f"{held.mape:.3f}"
            return Decision(True, f"held-out error {mape} above {self.settings.max_mape}")
        prediction = model.predict(features)
        if self.mode == "predicted":
            return Decision(False, f"{model.kind} predicted", prediction)
        if prediction.rel_halfwidth > self.settings.max_rel_halfwidth:
            return Decision(True, f"uncertain (+-{prediction.rel_halfwidth:.3f})", prediction)
        budget = _ratio_budget(constraints, meter.base_median_us)
        if budget is not None and prediction.low <= budget <= prediction.high:
            return Decision(True, "budget within the interval", prediction)
        if _could_enter_front(trials, self.target, error, prediction.low, measured):
            return Decision(True, "could enter the front", prediction)
        return Decision(False, f"{model.kind} predicted, dominated", prediction)


def _ratio_budget(constraints: Mapping[str, Any], base_median_us: float) -> float | None:
    if constraints.get("latency_budget_ratio") is not None:
        return float(constraints["latency_budget_ratio"])
    if constraints.get("latency_budget_us") is not None:
        return float(constraints["latency_budget_us"]) / base_median_us
    return None


def _could_enter_front(trials: list[optuna.trial.FrozenTrial], target: str, error: float, low: float,
                       measured: list[tuple[optuna.trial.FrozenTrial, float]]) -> bool:
    """No measured, feasible trial dominates (error, ``low``) on ``target``."""
    for trial, ratio in measured:
        if any(v > 0 for v in dict(trial.constraints).values()):
            continue
        other_error = float(trial.user_attrs["error"])
        if other_error <= error and ratio <= low and (other_error < error or ratio < low):
            return False
    return True


class Screening:
    """Every target's screen for one worker of a search."""

    def __init__(self, config: SearchConfig, meters: list[Meter], repo: Repository, *,
                 base: ArchitectureFeatures, base_fingerprint: str) -> None:
        store = LatencyModelStore(repo.engine)
        self.mode = config.latency
        self.constraints = config.constraints.model_dump()
        self.primary = config.targets[0]
        self.screens = {
            meter.profile.name: TargetScreen(meter, mode=config.latency, settings=config.screening, base=base,
                                             base_fingerprint=base_fingerprint, store=store)
            for meter in meters
        }

    def decide(self, trial: optuna.Trial, target: str, features: ArchitectureFeatures, signature: str,
               error: float) -> Decision:
        # Latency budgets bind the primary target only.
        constraints = self.constraints if target == self.primary else {}
        return self.screens[target].decide(trial, features, signature, error, constraints)

