"""The trial record: what a trial produced, typed and versioned, over Optuna's attributes.

Optuna stores a trial's figures as free-form user attributes; this module is the only code that
writes or reads them (and the study-level ones: confirmations, the base model's latency now,
final recovery scores, the sensitivity scan, NetAdapt's walk), as Optuna's own ``FrozenTrial`` is
for its fields. Everything else takes a ``TrialRecord`` (``read_trial``) and hands the writer
typed values, so a renamed key is one edit here, not a ``KeyError`` in another module.

Versions: 2 is the first tagged one (``record_version``). Trials stored before it (version 1,
every earlier release) read unchanged: a field they lack reads as its default here, and only here.
The base model's figures (``SearchRecord.base``) are read and written here too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from latency_models.predictors import ArchitectureFeatures

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

RECORD_VERSION = 2
_VERSION = "record_version"
# Trial user attributes, by the names every release has stored them under.
_PLAN, _KEPT, _SIGNATURE, _SHA256, _MEASURED_SHA256 = "plan", "kept", "signature", "artifact_sha256", "measured_sha256"
_ERROR, _ACCURACY, _REWARD, _MACS, _PARAMS = "error", "accuracy", "reward", "macs", "params"
_LATENCY, _LATENCY_US, _SOURCE, _REASON = "latency", "latency_us", "latency_source", "latency_reason"
_SCREENING, _STAGES, _RECOVERY, _FEATURES = "screening", "stage_s", "recovery", "features"
_WARNINGS, _CONSTRAINTS = "pruning_warnings", "constraints"
_FAIL_STAGE, _FAIL_REASON, _FAIL_TRACEBACK, _PRUNED = "fail_stage", "fail_reason", "fail_traceback", "pruned"
_BASE, _START, _NETADAPT_STEP = "base", "start", "netadapt_step"
_BUDGET_SCREEN = "budget_screen"  # why a plan was not tried (budget-aware proposals)
_MODEL_WORK = "model_work"  # {"device": "cuda:0", "threads": 8}: where recovery and scoring ran
# Study user attributes.
_CONFIRM_PREFIX = "confirm:"
_BASE_NOW = "base_latency_now"
_FINAL_PREFIX = "final:"
_SENSITIVITY = "sensitivity"
_NETADAPT_WALK = "netadapt_walk"
# Optuna's system attribute of the constraint list optuna-dashboard reads.
_CONSTRAINTS_SYSTEM = "constraints"


class LatencySource(StrEnum):
    """Where a trial's latency on a target came from."""

    MEASURED = "measured"
    PREDICTED = "predicted"


@dataclass(frozen=True, slots=True)
class Session:
    """One paired session's ratio to the base model and its 95% interval."""

    ratio: float
    ratio_ci: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "ratio_ci": list(self.ratio_ci)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Session:
        low, high = data["ratio_ci"]
        return cls(float(data["ratio"]), (float(low), float(high)))


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A target's verdict on one architecture over two or three sessions."""

    sessions: tuple[Session, ...]
    ratio: float
    interval: tuple[float, float]
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"sessions": [s.to_dict() for s in self.sessions], "ratio": self.ratio,
                "interval": list(self.interval), "elapsed_s": self.elapsed_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Confirmation:
        low, high = data["interval"]
        return cls(tuple(Session.from_dict(s) for s in data["sessions"]), float(data["ratio"]),
                   (float(low), float(high)), float(data.get("elapsed_s", 0.0)))


@dataclass(frozen=True, slots=True)
class TargetFigure:
    """A trial's first latency figure on one target: the paired ratio to the base model (or its
    prediction), the latency it implies and where it came from."""

    latency_us: float
    ratio: float
    ratio_ci: tuple[float, float]
    median_us: float
    cached: bool
    source: LatencySource = LatencySource.MEASURED

    @property
    def session(self) -> Session:
        return Session(self.ratio, self.ratio_ci)

    def to_dict(self) -> dict[str, Any]:
        return {"latency_us": self.latency_us, "ratio": self.ratio, "ratio_ci": list(self.ratio_ci),
                "median_us": self.median_us, "cached": self.cached, "source": str(self.source)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None, latency_us: float | None) -> TargetFigure:
        low, high = data["ratio_ci"]
        latency = float(data.get("latency_us", latency_us if latency_us is not None else math.nan))
        return cls(latency, float(data["ratio"]), (float(low), float(high)), float(data.get("median_us", latency)),
                   bool(data.get("cached", False)),
                   LatencySource(source or data.get("source") or LatencySource.MEASURED))


@dataclass(frozen=True, slots=True)
class Failure:
    """Where a failed trial stopped and why."""

    stage: str
    reason: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class EarlyStop:
    """A trial Optuna's pruner stopped before fine-tuning, on its reward on held-out data."""

    stage: str
    holdout_error: float
    reward: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished trial produced, handed to ``write_outcome`` (the figures of ``TrialRecord``
    a trial computes; the rest is written as it happens)."""

    error: float
    reward: float
    latency: Mapping[str, TargetFigure]
    macs: int
    params: int
    kept: Mapping[str, int]
    signature: str
    artifact_sha256: str
    stage_s: Mapping[str, float]
    measured_sha256: str | None = None  # with trial pruning: the file measured before recovery
    features: ArchitectureFeatures | None = None
    screening: Mapping[str, str] = field(default_factory=dict)
    latency_reason: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TrialRecord:
    """One trial as stored: its state, plan and figures (``None``/empty where it never got them).

    ``state`` is Optuna's state name (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ``WAITING``).
    """

    number: int
    state: str
    version: int
    params: Mapping[str, Any]
    started: datetime | None
    finished: datetime | None
    plan: Mapping[str, Any] | None
    kept: Mapping[str, int]
    signature: str
    artifact_sha256: str
    measured_sha256: str
    error: float | None
    reward: float | None
    latency: Mapping[str, TargetFigure]
    macs: int
    params_count: int
    constraints: Mapping[str, float]
    stage_s: Mapping[str, float]
    recovery: Mapping[str, Any] | None
    failure: Failure | None
    early_stop: EarlyStop | None
    features: ArchitectureFeatures | None
    screening: Mapping[str, str]
    latency_reason: Mapping[str, str]
    pruning_warnings: tuple[str, ...]
    enqueued_as_base: bool
    start: str | None
    netadapt_step: int | None
    # Where the trial's recovery and scoring ran; trials stored before devices existed ran on the CPU.
    model_device: str = "cpu"
    recovery_threads: int | None = None
    # Budget-aware proposals: why the plan was pruned untried (predicted far outside the budget).
    budget_screened: str | None = None

    @property
    def accuracy(self) -> float | None:
        return None if self.error is None else 1.0 - self.error

    @property
    def has_figures(self) -> bool:
        """A completed trial with its error (one that failed while being told has none)."""
        return self.state == "COMPLETE" and self.error is not None

    @property
    def latency_us(self) -> dict[str, float]:
        return {target: figure.latency_us for target, figure in self.latency.items()}

    @property
    def seconds(self) -> float | None:
        """How long a finished trial ran (None while it runs or if it never started)."""
        if self.started is None or self.finished is None:
            return None
        return (self.finished - self.started).total_seconds()

    def predicted(self, target: str) -> bool:
        figure = self.latency.get(target)
        return figure is not None and figure.source == LatencySource.PREDICTED


# --- reading ------------------------------------------------------------------------------------


def _floats(value: Any) -> dict[str, float]:
    return {str(k): float(v) for k, v in dict(value or {}).items()}


def _latency(attrs: Mapping[str, Any]) -> dict[str, TargetFigure]:
    sources = dict(attrs.get(_SOURCE) or {})
    latency_us = dict(attrs.get(_LATENCY_US) or {})
    return {str(target): TargetFigure.from_dict(figures, source=sources.get(target), latency_us=latency_us.get(target))
            for target, figures in dict(attrs.get(_LATENCY) or {}).items()}


def read_trial(trial: FrozenTrial) -> TrialRecord:
    """The record of one stored trial, from any hwprune version."""
    attrs = trial.user_attrs
    error = attrs.get(_ERROR)
    pruned = attrs.get(_PRUNED)
    failed = attrs.get(_FAIL_STAGE)
    features = attrs.get(_FEATURES)
    step = attrs.get(_NETADAPT_STEP)
    return TrialRecord(
        number=trial.number, state=trial.state.name, version=int(attrs.get(_VERSION, 1)),
        params=dict(trial.params), started=trial.datetime_start, finished=trial.datetime_complete,
        plan=attrs.get(_PLAN), kept={str(k): int(v) for k, v in dict(attrs.get(_KEPT) or {}).items()},
        signature=str(attrs.get(_SIGNATURE, "")), artifact_sha256=str(attrs.get(_SHA256, "")),
        measured_sha256=str(attrs.get(_MEASURED_SHA256) or attrs.get(_SHA256, "")),
        error=None if error is None else float(error),
        reward=None if attrs.get(_REWARD) is None else float(attrs[_REWARD]),
        latency=_latency(attrs), macs=int(attrs.get(_MACS, 0)), params_count=int(attrs.get(_PARAMS, 0)),
        # The unnamed copies Optuna reads back from the list form kept for optuna-dashboard ("0",
        # "1", ...) are left out.
        constraints={k: float(v) for k, v in trial.constraints.items() if not k.isdigit()},
        stage_s=_floats(attrs.get(_STAGES)), recovery=attrs.get(_RECOVERY),
        failure=None if failed is None else Failure(str(failed), str(attrs.get(_FAIL_REASON, "")),
                                                    str(attrs.get(_FAIL_TRACEBACK, ""))),
        early_stop=None if not pruned else EarlyStop(str(pruned["stage"]), float(pruned["holdout_error"]),
                                                     float(pruned["reward"])),
        features=None if features is None else ArchitectureFeatures.from_dict(features),
        screening=dict(attrs.get(_SCREENING) or {}), latency_reason=dict(attrs.get(_REASON) or {}),
        pruning_warnings=tuple(attrs.get(_WARNINGS) or ()), enqueued_as_base=bool(attrs.get(_BASE)),
        start=attrs.get(_START), netadapt_step=None if step is None else int(step),
        model_device=str(dict(attrs.get(_MODEL_WORK) or {}).get("device", "cpu")),
        recovery_threads=dict(attrs.get(_MODEL_WORK) or {}).get("threads"),
        budget_screened=attrs.get(_BUDGET_SCREEN),
    )


def read_trials(study: optuna.Study, states: Sequence[str] | None = None) -> list[TrialRecord]:
    """Every trial of ``study`` (in ``states``, Optuna state names, when given), by number."""
    from optuna.trial import TrialState

    chosen = None if states is None else tuple(TrialState[s] for s in states)
    return [read_trial(t) for t in study.get_trials(deepcopy=False, states=chosen)]


def read_stored_trial(storage: optuna.storages.BaseStorage, trial_id: int) -> TrialRecord:
    """One trial by its storage id (the trial loop's view after a tell)."""
    return read_trial(storage.get_trial(trial_id))


# --- writing a running trial --------------------------------------------------------------------


def write_plan(trial: optuna.Trial, plan: Mapping[str, Any]) -> None:
    """The first write of a trial: its plan, under this record version."""
    trial.set_user_attr(_VERSION, RECORD_VERSION)
    trial.set_user_attr(_PLAN, dict(plan))


def write_model_work(trial: optuna.Trial, *, device: str, threads: int) -> None:
    """Where this trial's recovery and scoring run: a replay must run on the same kind of device
    with the same thread count to reproduce its weights."""
    trial.set_user_attr(_MODEL_WORK, {"device": device, "threads": threads})


def write_budget_screen(trial: optuna.Trial, reason: str, stage_s: Mapping[str, float]) -> None:
    """A plan pruned untried: the latency model put it far outside the budget's band."""
    trial.set_user_attr(_BUDGET_SCREEN, reason)
    trial.set_user_attr(_STAGES, dict(stage_s))


def write_pruning_warnings(trial: optuna.Trial, warnings: Sequence[str]) -> None:
    if warnings:
        trial.set_user_attr(_WARNINGS, list(warnings))


def write_recovery(trial: optuna.Trial, report: Mapping[str, Any]) -> None:
    trial.set_user_attr(_RECOVERY, dict(report))


def write_stage_times(trial: optuna.Trial, stage_s: Mapping[str, float]) -> None:
    trial.set_user_attr(_STAGES, dict(stage_s))


def write_failure(trial: optuna.Trial, failure: Failure, stage_s: Mapping[str, float]) -> None:
    trial.set_user_attr(_FAIL_STAGE, failure.stage)
    trial.set_user_attr(_FAIL_REASON, failure.reason[:2000])
    trial.set_user_attr(_FAIL_TRACEBACK, failure.traceback[-4000:])
    write_stage_times(trial, stage_s)


def _figure_attrs(latency: Mapping[str, TargetFigure], *, macs: int, params: int, kept: Mapping[str, int],
                  signature: str, artifact_sha256: str) -> dict[str, Any]:
    return {
        _LATENCY_US: {name: f.latency_us for name, f in latency.items()},
        _LATENCY: {name: f.to_dict() for name, f in latency.items()},
        _SOURCE: {name: str(f.source) for name, f in latency.items()},
        _MACS: macs, _PARAMS: params, _KEPT: dict(kept), _SIGNATURE: signature, _SHA256: artifact_sha256,
    }


def write_early_stop(trial: optuna.Trial, stop: EarlyStop, latency: Mapping[str, TargetFigure], *,
                     macs: int, params: int, kept: Mapping[str, int], signature: str,
                     artifact_sha256: str) -> None:
    """A trial stopped before fine-tuning: why, and the latency measured before it stopped."""
    trial.set_user_attr(_PRUNED, stop.to_dict())
    for key, value in _figure_attrs(latency, macs=macs, params=params, kept=kept, signature=signature,
                                    artifact_sha256=artifact_sha256).items():
        trial.set_user_attr(key, value)


def write_outcome(trial: optuna.Trial, outcome: Outcome) -> None:
    """A finished trial's figures."""
    attrs: dict[str, Any] = {
        _ERROR: outcome.error, _ACCURACY: 1.0 - outcome.error, _REWARD: outcome.reward,
        **_figure_attrs(outcome.latency, macs=outcome.macs, params=outcome.params, kept=outcome.kept,
                        signature=outcome.signature, artifact_sha256=outcome.artifact_sha256),
        _STAGES: dict(outcome.stage_s),
    }
    if outcome.measured_sha256 is not None:
        attrs[_MEASURED_SHA256] = outcome.measured_sha256
    if outcome.features is not None:
        # The predictor's training data: shared by every worker through the study.
        attrs[_FEATURES] = outcome.features.to_dict()
        attrs[_SCREENING] = dict(outcome.screening)
        attrs[_REASON] = dict(outcome.latency_reason)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def write_constraints(trial: optuna.Trial, values: Mapping[str, float]) -> None:
    """Constraint values by name (<= 0 feasible), for Optuna's samplers and for readers."""
    for key, value in values.items():
        trial.set_constraint(key, value)
    if values:
        # optuna-dashboard (0.21) reads the older list form, system attribute "constraints", and
        # shows "constraints: []" without it; Optuna reads that form too, as keys "0", "1", ...
        # (``read_trial`` drops them again). The names stay readable in a user attribute.
        trial.storage.set_trial_system_attr(trial._trial_id, _CONSTRAINTS_SYSTEM, list(values.values()))
        trial.set_user_attr(_CONSTRAINTS, dict(values))


def enqueue(study: optuna.Study, params: Mapping[str, Any], *, base: bool = False, start: str | None = None,
            netadapt_step: int | None = None, skip_if_exists: bool = False) -> None:
    """Enqueue a plan's parameters as a trial, marked with why it was enqueued."""
    marks: dict[str, Any] = {}
    if base:
        marks[_BASE] = True
    if start is not None:
        marks[_START] = start
    if netadapt_step is not None:
        marks[_NETADAPT_STEP] = netadapt_step
    study.enqueue_trial(dict(params), user_attrs=marks, skip_if_exists=skip_if_exists)


# --- the study's own attributes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FinalScore:
    """A trial's error after the final recovery, beside its search-time error."""

    trial: int
    steps: int
    error: float
    search_error: float
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class WalkStep:
    """One NetAdapt step: its latency target and the trial it kept."""

    step: int
    target_ratio: float
    trial: int
    latency_ratio: float
    error: float
    met: bool
    candidates: int


def read_confirmations(study: optuna.Study) -> dict[tuple[str, str], Confirmation]:
    """Every confirmation of ``study``, by (target, architecture signature)."""
    found = {}
    for name, value in study.user_attrs.items():
        if name.startswith(_CONFIRM_PREFIX):
            target, _, signature = name[len(_CONFIRM_PREFIX):].rpartition(":")
            found[(target, signature)] = Confirmation.from_dict(value)
    return found


def write_confirmation(study: optuna.Study, target: str, signature: str, verdict: Confirmation) -> None:
    study.set_user_attr(f"{_CONFIRM_PREFIX}{target}:{signature}", verdict.to_dict())


def read_base_now(study: optuna.Study) -> dict[str, float]:
    """The base model's latency per target as re-measured at the last confirmation."""
    return _floats(study.user_attrs.get(_BASE_NOW))


def write_base_now(study: optuna.Study, latency_us: Mapping[str, float]) -> None:
    study.set_user_attr(_BASE_NOW, dict(latency_us))


def read_final_scores(study: optuna.Study) -> dict[int, FinalScore]:
    """Final recovery scores by trial number (Optuna refuses attributes on finished trials)."""
    return {int(name[len(_FINAL_PREFIX):]): FinalScore(**value) for name, value in study.user_attrs.items()
            if name.startswith(_FINAL_PREFIX)}


def write_final_score(study: optuna.Study, score: FinalScore) -> None:
    study.set_user_attr(f"{_FINAL_PREFIX}{score.trial}", score.to_dict())


def read_sensitivity(study: optuna.Study) -> Mapping[str, Any] | None:
    """The stored sensitivity scan as plain data (``search.study.sensitivity`` parses it)."""
    return study.user_attrs.get(_SENSITIVITY) or None


def write_sensitivity(study: optuna.Study, data: Mapping[str, Any]) -> None:
    study.set_user_attr(_SENSITIVITY, dict(data))


def read_walk(study: optuna.Study) -> list[WalkStep]:
    return [WalkStep(int(s["step"]), float(s["target_ratio"]), int(s["trial"]), float(s["latency_ratio"]),
                     float(s["error"]), bool(s["met"]), int(s["candidates"]))
            for s in study.user_attrs.get(_NETADAPT_WALK) or []]


def write_walk(study: optuna.Study, walk: Sequence[WalkStep]) -> None:
    study.set_user_attr(_NETADAPT_WALK, [asdict(step) for step in walk])


# --- the base model's figures (stored with the search, in hwprune's table) ----------------------


@dataclass(frozen=True, slots=True)
class BaseFigures:
    """The base model as measured when the search was created: trial 0's reference.

    ``measurements`` holds each target's base measurement as stored (``Measurement.to_dict``);
    ``error_floor`` is None for searches stored before it was recorded.
    """

    error: float
    macs: int
    params: int
    signature: str
    artifact_sha256: str
    measurements: Mapping[str, Mapping[str, Any]]
    error_floor: float | None = None
    model_device: str = "cpu"  # where the base was scored; searches stored before devices: the CPU
    # What the error measures and what 1 - error is (None: no figure of its own); searches stored
    # before these were recorded say only "error".
    error_name: str = "error"
    score_name: str | None = None

    def median_us(self, target: str) -> float:
        return float(self.measurements[target]["median_us"])

    @property
    def latency_us(self) -> dict[str, float]:
        return {target: self.median_us(target) for target in self.measurements}

    def to_dict(self) -> dict[str, Any]:
        data = {"error": self.error, "macs": self.macs, "params": self.params, "signature": self.signature,
                "artifact_sha256": self.artifact_sha256,
                "measurements": {k: dict(v) for k, v in self.measurements.items()}}
        return (data | ({} if self.error_floor is None else {"error_floor": self.error_floor})
                | {"model_device": self.model_device, "error_name": self.error_name}
                | ({} if self.score_name is None else {"score_name": self.score_name}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaseFigures:
        floor = data.get("error_floor")
        return cls(float(data["error"]), int(data.get("macs", 0)), int(data.get("params", 0)),
                   str(data["signature"]), str(data["artifact_sha256"]),
                   {str(k): dict(v) for k, v in dict(data["measurements"]).items()},
                   None if floor is None else float(floor), str(data.get("model_device", "cpu")),
                   str(data.get("error_name", "error")),
                   None if data.get("score_name") is None else str(data["score_name"]))
