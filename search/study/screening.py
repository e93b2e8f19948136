"""Hybrid latency: predict a trial's latency ratio where the predictor has earned it, measure
where it has not.

Per target, a trial's latency is **measured** when
* the architecture is the base model or already in the measurement cache (free), or
* fewer than ``min_measured`` trials of the search were measured on that target, or
* the predictor's held-out mean error (cross-validated on the measured trials) is above
  ``max_mape``, or
* (hybrid) the candidate's conformal interval is wider than ``+-max_rel_halfwidth``, or
* (hybrid) a latency budget lies inside its interval, or
* (hybrid) the trial could enter that target's Pareto front: no measured feasible trial
  dominates (error, optimistic ratio), the optimistic ratio being the prediction lowered by
  ``front_margin`` times the held-out mean error (or, with ``front_margin`` None, the low end of
  the 90% interval).

Otherwise the prediction is stored, marked ``predicted``, with the deciding rule per target in
``latency_reason`` (``REASONS``). A predicted trial looked dominated by a measured one at its
optimistic figure, so its stored (point) figure is dominated too. It can still surface onto the
front later, when a confirmation raises a measured trial's figure; then the front's confirmation
(the end of every search, ``search.study.controller.confirm_front``) measures it in two fresh
sessions and never counts the prediction as one, repeating until the front holds only confirmed
figures. If that measurement fails, the trial is left out of the front a user is shown
(``search.study.read.shown_front``). Nothing on a front is a prediction. The risk the margin
takes is the other way: a trial whose true latency is lower than its prediction by more than the
margin is wrongly judged dominated and lost, which costs hypervolume (measured in
docs/benchmarks.md, "hybrid-search"). Why not the whole interval's low end: on a Pareto search
most candidates lie near the front, so that rule measured nearly every trial.

**Budget-aware proposals** (``screening.budget_band``, with a latency budget; AMC's action
clipping with the latency model in place of FLOPs): before a plan is recovered, the primary
target's predictor judges it, and a plan whose whole 90% interval lies outside the budget's band
(above ``budget * (1 + band)`` or below ``budget * (1 - band)``) is neither recovered nor
measured: the trial is stored PRUNED with the reason in ``budget_screen`` and does not count
toward ``trials`` (``search.study.runtime.counted``), so the sampler proposes again. The predictor
judges only once it has earned it: ``min_measured`` measured trials and a held-out mean error
below the band. At most ``MAX_SCREENED_PER_TRIAL`` times ``trials`` proposals are screened out in
a search, so a budget no plan meets cannot keep a search from ending. With a band, every latency
mode records features, so a ``measured`` search trains the predictor too.

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
from dataclasses import dataclass

import optuna

from latency_models import Meter
from latency_models.predictors import (
    ArchitectureFeatures,
    LatencyModel,
    LearnedModel,
    Prediction,
)
from latency_models.store import MeasurementKey
from search.config import ConstraintsConfig, ScreeningSettings, SearchConfig
from search.storage import Repository
from search.storage.predictor_store import LatencyModelStore
from search.storage.record import LatencySource, TrialRecord, read_trials

logger = logging.getLogger(__name__)

SAVE_EVERY = 10
MEASURED = LatencySource.MEASURED
PREDICTED = LatencySource.PREDICTED
CACHED = "cached"


# Which rule decided, stored per target as the trial's ``latency_reason`` (one word, for tallies;
# ``screening`` keeps the sentence with its figures).
BASE = "base"
WARMUP = "warmup"
HELD_OUT = "held-out-error"
UNCERTAIN = "uncertain"
BUDGET = "budget"
FRONT = "front"
DOMINATED = "dominated"
PREDICTED_MODE = "predicted-mode"
MEASURED_MODE = "measured-mode"
REASONS = (BASE, CACHED, WARMUP, HELD_OUT, UNCERTAIN, BUDGET, FRONT, DOMINATED, PREDICTED_MODE, MEASURED_MODE)
MAX_SCREENED_PER_TRIAL = 3


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to measure one target for one trial, which rule decided (``rule``, one of
    ``REASONS``) and why in words; ``prediction`` when one was made."""

    measure: bool
    rule: str
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

    @property
    def active(self) -> LatencyModel:
        """The model with the lowest held-out error (the learned one until any has one)."""
        scored = [m for m in self.models if m.held_out is not None]
        return min(scored, key=lambda m: m.held_out.mape if m.held_out else math.inf) if scored else self.models[0]

    def _measured(self, trials: list[TrialRecord]) -> list[tuple[TrialRecord, float]]:
        found = []
        for trial in trials:
            figure = trial.latency.get(self.target)
            if figure is None or figure.source == PREDICTED or trial.features is None or trial.error is None:
                continue
            found.append((trial, figure.ratio))
        return found

    def _refit(self, measured: list[tuple[TrialRecord, float]]) -> None:
        if len(measured) == self._fitted_on:
            return
        samples = dict(self.seed_samples)
        for trial, ratio in measured:
            if trial.features is not None:
                samples[trial.features] = ratio
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
               constraints: ConstraintsConfig | None) -> Decision:
        meter = self.meter
        if signature == meter.base.signature:
            return Decision(True, BASE, "base model")
        if meter.store.find_measurement(MeasurementKey(signature, meter.profile.fingerprint(), meter.base.sha256)):
            return Decision(True, CACHED, "cached")
        if self.mode == "measured":  # screening only for budget-aware proposals: features recorded
            return Decision(True, MEASURED_MODE, "every latency measured")
        trials = read_trials(trial.study, ["COMPLETE"])
        measured = self._measured(trials)
        if len(measured) < self.settings.min_measured:
            return Decision(True, WARMUP, f"{len(measured)} of {self.settings.min_measured} measured trials")
        self._refit(measured)
        model = self.active
        held = model.held_out
        if held is None or held.mape > self.settings.max_mape:
            mape = "none" if held is None else f"{held.mape:.3f}"
            return Decision(True, HELD_OUT, f"held-out error {mape} above {self.settings.max_mape}")
        prediction = model.predict(features)
        if self.mode == "predicted":
            return Decision(False, PREDICTED_MODE, f"{model.kind} predicted", prediction)
        if prediction.rel_halfwidth > self.settings.max_rel_halfwidth:
            return Decision(True, UNCERTAIN, f"uncertain (+-{prediction.rel_halfwidth:.3f})", prediction)
        budget = _ratio_budget(constraints, meter.base_median_us)
        if budget is not None and prediction.low <= budget <= prediction.high:
            return Decision(True, BUDGET, "budget within the interval", prediction)
        # The optimistic figure the front is judged on: the prediction lowered by a margin of the
        # held-out mean error (a trial that is wrongly judged dominated costs hypervolume; one
        # that wrongly looks like a front member is measured by confirmation), or the interval's
        # low end (front_margin None: nearly every candidate near the front is measured).
        margin = self.settings.front_margin
        optimistic = prediction.low if margin is None else prediction.ratio * (1 - margin * held.mape)
        if _could_enter_front(trials, self.target, error, optimistic, measured):
            return Decision(True, FRONT, f"could enter the front at {optimistic:.4f}", prediction)
        return Decision(False, DOMINATED, f"{model.kind} predicted, dominated", prediction)


    def outside_band(self, trial: optuna.Trial, features: ArchitectureFeatures, budget: float,
                     band: float) -> str | None:
        """Why the plan is predicted far outside ``budget``'s band, or None (also while the
        predictor has not earned a judgement)."""
        measured = self._measured(read_trials(trial.study, ["COMPLETE"]))
        if len(measured) < self.settings.min_measured:
            return None
        self._refit(measured)
        model = self.active
        if model.held_out is None or model.held_out.mape > band:
            return None
        prediction = model.predict(features)
        if prediction.low > budget * (1 + band):
            side = f"above the budget's band (<= {budget * (1 + band):.3f})"
        elif prediction.high < budget * (1 - band):
            side = f"below the budget's band (>= {budget * (1 - band):.3f})"
        else:
            return None
        return (f"{model.kind} predicts ratio {prediction.ratio:.3f} [{prediction.low:.3f}, {prediction.high:.3f}], "
                f"{side} on {self.target}")


def _ratio_budget(constraints: ConstraintsConfig | None, base_median_us: float) -> float | None:
    if constraints is None:
        return None
    if constraints.latency_budget_ratio is not None:
        return constraints.latency_budget_ratio
    if constraints.latency_budget_us is not None:
        return constraints.latency_budget_us / base_median_us
    return None


def _could_enter_front(trials: list[TrialRecord], target: str, error: float, low: float,
                       measured: list[tuple[TrialRecord, float]]) -> bool:
    """No measured, feasible trial dominates (error, ``low``) on ``target``."""
    for trial, ratio in measured:
        if any(v > 0 for v in trial.constraints.values()) or trial.error is None:
            continue
        other_error = trial.error
        if other_error <= error and ratio <= low and (other_error < error or ratio < low):
            return False
    return True


class Screening:
    """Every target's screen for one worker of a search."""

    def __init__(self, config: SearchConfig, meters: list[Meter], repo: Repository, *,
                 base: ArchitectureFeatures, base_fingerprint: str) -> None:
        store = LatencyModelStore(repo.engine)
        self.mode = config.latency
        self.constraints = config.constraints
        self.primary = config.targets[0]
        self.budget_band = config.screening.budget_band
        self.trials = config.trials
        self.screens = {
            meter.profile.name: TargetScreen(meter, mode=config.latency, settings=config.screening, base=base,
                                             base_fingerprint=base_fingerprint, store=store)
            for meter in meters
        }

    def decide(self, trial: optuna.Trial, target: str, features: ArchitectureFeatures, signature: str,
               error: float) -> Decision:
        # Latency budgets bind the primary target only.
        constraints = self.constraints if target == self.primary else None
        return self.screens[target].decide(trial, features, signature, error, constraints)

    def outside_budget(self, trial: optuna.Trial, features: ArchitectureFeatures) -> str | None:
        """Why this plan should not be tried (see "Budget-aware proposals"), or None."""
        screen = self.screens[self.primary]
        budget = _ratio_budget(self.constraints, screen.meter.base_median_us)
        if self.budget_band is None or budget is None or self.trials is None:
            return None
        screened = sum(1 for t in read_trials(trial.study, ["PRUNED"]) if t.budget_screened)
        if screened >= MAX_SCREENED_PER_TRIAL * self.trials:
            return None
        return screen.outside_band(trial, features, budget, self.budget_band)

