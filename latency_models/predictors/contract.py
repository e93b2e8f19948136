"""The latency-model contract: fit on measured ratios, predict a ratio with an interval, say how
wrong it is on data it has not seen, and travel as a versioned JSON state.

A latency model belongs to one base model and one profile fingerprint (the settings a ratio was
measured with). It predicts a plan's latency *ratio to the base model*: on a shared machine
absolute medians drift 10-20% between sessions while paired ratios hold within 0.4-1.5%
(docs/benchmarks.md), so the search multiplies the prediction by its current base latency.

Honesty about error comes from cross-validation: ``fit`` predicts every sample from a model that
never saw it (K folds), keeps those held-out errors (``HeldOutError``) and turns them into a
split-conformal quantile of normalised scores, ``|log(predicted / measured)| / scale``, where
``scale`` is the model's own per-candidate spread (1 for models without one). A prediction's
interval is ``ratio * exp(+-quantile * scale)``: on exchangeable data it covers the measured
ratio with probability ``COVERAGE`` or more (cross-conformal; slightly less in the worst case).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from latency_models.errors import LatencyError
from latency_models.predictors.features import ArchitectureFeatures, FeatureError

STATE_VERSION = 1
COVERAGE = 0.9
FOLDS = 5
MIN_SAMPLES_FOR_ERROR = 6  # fewer: no held-out error, an infinite interval
MAX_SAMPLES = 4000  # a state stays a few MB at most

Sample = tuple[ArchitectureFeatures, float]


class LatencyModelError(LatencyError):
    """A latency model's state or training data is unusable (exit status 2)."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Prediction:
    """A predicted ratio to the base model and its conformal interval (``COVERAGE``)."""

    ratio: float
    low: float
    high: float

    @property
    def rel_halfwidth(self) -> float:
        """Half the interval's width relative to the prediction (inf when unknown)."""
        if not math.isfinite(self.high):
            return math.inf
        return (self.high - self.low) / (2 * self.ratio)


@dataclass(frozen=True, slots=True)
class HeldOutError:
    """How wrong a model was on samples it was not fitted on (out-of-fold predictions).

    ``within_5``/``within_10``: share of samples predicted within +-5% / +-10% of the measured
    ratio; ``mape`` mean absolute relative error; ``worst`` the largest; ``quantile`` the
    conformal quantile of normalised scores at ``COVERAGE``.
    """

    n: int
    within_5: float
    within_10: float
    mape: float
    worst: float
    quantile: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeldOutError:
        return cls(int(data["n"]), float(data["within_5"]), float(data["within_10"]), float(data["mape"]),
                   float(data["worst"]), float(data["quantile"]))


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    return [p / m - 1.0 for p, m in zip(predicted, measured, strict=True)]


def summarize_errors(predicted: Sequence[float], measured: Sequence[float], scales: Sequence[float]) -> HeldOutError:
    """Held-out statistics of out-of-fold predictions (and their conformal quantile)."""
    errors = [abs(e) for e in relative_errors(predicted, measured)]
    n = len(errors)
    scores = sorted(abs(math.log(p / m)) / s for p, m, s in zip(predicted, measured, scales, strict=True))
    return HeldOutError(
        n=n,
        within_5=sum(e <= 0.05 for e in errors) / n,
        within_10=sum(e <= 0.10 for e in errors) / n,
        mape=sum(errors) / n,
        worst=max(errors),
        quantile=conformal_quantile(scores, COVERAGE),
    )


def conformal_quantile(sorted_scores: Sequence[float], coverage: float) -> float:
    """The split-conformal quantile: the ceil((n+1)coverage)-th smallest score (inf if n is short)."""
    rank = math.ceil((len(sorted_scores) + 1) * coverage)
    return sorted_scores[rank - 1] if rank <= len(sorted_scores) else math.inf


def _check_samples(samples: Sequence[Sample]) -> None:
    for features, ratio in samples:
        if not isinstance(features, ArchitectureFeatures):
            raise FeatureError(f"expected ArchitectureFeatures, got {type(features).__name__}")
        if not (math.isfinite(ratio) and ratio > 0):
            raise LatencyModelError(f"a measured ratio must be a positive finite number, got {ratio!r}")


class LatencyModel(abc.ABC):
    """A predictor of a plan's latency ratio to its base model, on one profile. The contract:

    * ``fit(samples)`` takes (features, measured ratio) pairs; it cross-validates first (the
      held-out error and conformal quantile are set from folds the model never saw), then fits on
      everything. It keeps the samples, so a refit adds to them.
    * ``predict(features)`` returns the ratio and its interval; before a fit with enough samples
      for a held-out error, the interval is infinite (nothing trusts it).
    * ``to_state()`` / ``from_state()`` round-trip through JSON-able data tagged with ``kind`` and
      ``STATE_VERSION``; the database stores that (``search.storage.latency_models``).
    * Implementations provide ``_fit_core`` and ``_predict_core`` (ratio and a relative spread,
      the conformal scale) and ``_params``/``_load_params`` for their own state.
    """

    kind: ClassVar[str] = ""

    def __init__(self, base: ArchitectureFeatures) -> None:
        self.base = base
        self.samples: list[Sample] = []
        self.held_out: HeldOutError | None = None

    # --- what implementations provide ---------------------------------------------------------

    @abc.abstractmethod
    def _fit_core(self, samples: Sequence[Sample]) -> None:
        """Fit on ``samples`` (the base model at ratio 1 is always among them)."""

    @abc.abstractmethod
    def _predict_core(self, features: ArchitectureFeatures) -> tuple[float, float]:
        """The predicted ratio and its relative spread (> 0)."""

    @abc.abstractmethod
    def _params(self) -> dict[str, Any]:
        """The fitted state as JSON-able data."""

    @abc.abstractmethod
    def _load_params(self, params: Mapping[str, Any]) -> None:
        """Restore what ``_params`` returned."""

    def _fresh(self) -> LatencyModel:
        """An unfitted model of the same kind and settings (for cross-validation folds)."""
        return type(self)(self.base)

    # --- shared ---------------------------------------------------------------------------------

    def fit(self, samples: Sequence[Sample], *, folds: int = FOLDS) -> HeldOutError | None:
        """Add ``samples`` to the model's own and refit; returns the held-out error (None while
        there are fewer than ``MIN_SAMPLES_FOR_ERROR`` samples)."""
        _check_samples(samples)
        data = (self.samples + list(samples))[-MAX_SAMPLES:]
        anchor: Sample = (self.base, 1.0)
        enough = len(data) >= MIN_SAMPLES_FOR_ERROR
        self.held_out = _cross_validate(self._fresh, data, anchor, folds) if enough else None
        self._fit_core([anchor, *data])
        self.samples = data
        return self.held_out

    def predict(self, features: ArchitectureFeatures) -> Prediction:
        ratio, scale = self._predict_core(features)
        ratio = max(ratio, 1e-3)
        quantile = self.held_out.quantile if self.held_out is not None else math.inf
        if not math.isfinite(quantile):
            return Prediction(ratio, 0.0, math.inf)
        width = quantile * scale
        return Prediction(ratio, ratio * math.exp(-width), ratio * math.exp(width))

    def to_state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "base": self.base.to_dict(),
            "samples": [[f.to_dict(), r] for f, r in self.samples],
            "held_out": None if self.held_out is None else self.held_out.to_dict(),
            "params": self._params(),
        }

    @classmethod
    def _from_parts(cls, base: ArchitectureFeatures, params: Mapping[str, Any]) -> LatencyModel:
        model = cls(base)
        model._load_params(params)
        return model


_KINDS: dict[str, type[LatencyModel]] = {}


def register_kind(cls: type[LatencyModel]) -> type[LatencyModel]:
    if cls.kind in _KINDS:
        raise LatencyModelError(f"latency model kind {cls.kind!r} registered twice")
    _KINDS[cls.kind] = cls
    return cls


def kinds() -> list[str]:
    return sorted(_KINDS)


def from_state(state: Any) -> LatencyModel:
    """Rebuild a model from ``to_state()`` data.

    Raises:
        LatencyModelError: unknown kind, a state version this code does not read, or bad data.
    """
    if not isinstance(state, Mapping):
        raise LatencyModelError("a latency model state must be a mapping")
    kind, version = state.get("kind"), state.get("version")
    if kind not in _KINDS:
        raise LatencyModelError(f"unknown latency model kind {kind!r}; known: {', '.join(kinds())}")
    if version != STATE_VERSION:
        raise LatencyModelError(f"latency model state version {version!r}; this hwprune reads {STATE_VERSION}")
    try:
        model = _KINDS[str(kind)]._from_parts(ArchitectureFeatures.from_dict(state["base"]), state["params"])
        model.samples = [(ArchitectureFeatures.from_dict(f), float(r)) for f, r in state.get("samples", [])]
        held = state.get("held_out")
        model.held_out = None if held is None else HeldOutError.from_dict(held)
    except (KeyError, TypeError, ValueError) as exc:
        raise LatencyModelError(f"latency model state is malformed: {exc!r}") from None
    return model


def _cross_validate(fresh: Callable[[], LatencyModel], data: Sequence[Sample], anchor: Sample,
                    folds: int) -> HeldOutError:
    """Out-of-fold predictions of every sample (folds by position: deterministic)."""
    folds = max(2, min(folds, len(data)))
    predicted: list[float] = [0.0] * len(data)
    scales: list[float] = [1.0] * len(data)
    for fold in range(folds):
        train = [s for i, s in enumerate(data) if i % folds != fold]
        model = fresh()
        model._fit_core([anchor, *train])
        for i in range(fold, len(data), folds):
            ratio, scale = model._predict_core(data[i][0])
            predicted[i], scales[i] = max(ratio, 1e-3), scale
    return summarize_errors(predicted, [r for _, r in data], scales)


def held_out_error(model: LatencyModel, samples: Sequence[Sample]) -> HeldOutError:
    """Error of an already fitted ``model`` on ``samples`` it was not fitted on (a test set)."""
    _check_samples(samples)
    if not samples:
        raise LatencyModelError("no samples to evaluate on")
    predicted, scales = zip(*(model._predict_core(f) for f, _ in samples), strict=True)
    return summarize_errors([max(p, 1e-3) for p in predicted], [r for _, r in samples], scales)
