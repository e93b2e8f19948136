"""The learned latency model: ridge regression of the ratio on per-layer MACs, bytes and N:M
choices, as a bootstrap ensemble whose spread scales the conformal interval.

Why linear: a model's latency is close to a sum of its layers' latencies, and within one base
model each layer's latency is close to linear in its MACs and bytes; a ridge model on per-layer
fractions is a lookup table whose entries are learned from whole-model measurements. Gradient-
boosted trees were measured against it (bench/predictor.py, docs/benchmarks.md) and cannot add
layers up: they were worse at equal samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from latency_models.predictors.contract import LatencyModel, Sample, register_kind
from latency_models.predictors.features import ArchitectureFeatures

ENSEMBLE = 8
ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MIN_SCALE = 0.003  # members that agree exactly still leave measurement noise


def vectorize(base: ArchitectureFeatures, features: ArchitectureFeatures) -> list[float]:
    """One row of the design matrix: per base layer, its MACs and bytes as fractions of the base
    model's totals, and its MAC fraction again when it runs an N:M pattern."""
    macs = base.macs or 1
    moved = base.bytes_moved or 1
    layers = features.by_name()
    row: list[float] = []
    for reference in base.layers:
        layer = layers.get(reference.name)
        if layer is None:
            row.extend((0.0, 0.0, 0.0))
            continue
        row.extend((layer.macs / macs, layer.bytes_moved / moved, layer.macs / macs if layer.nm != "dense" else 0.0))
    return row


@register_kind
class LearnedModel(LatencyModel):
    """Ridge ensemble on ``vectorize`` rows (see the module docstring)."""

    kind = "learned"

    def __init__(self, base: ArchitectureFeatures) -> None:
        super().__init__(base)
        self.alpha = 1e-3
        self.members: list[tuple[list[float], float]] = []

    def _fit_core(self, samples: Sequence[Sample]) -> None:
        import numpy as np
        from sklearn.linear_model import Ridge, RidgeCV

        x = np.array([vectorize(self.base, f) for f, _ in samples])
        y = np.array([r for _, r in samples])
        if len(samples) >= 3:
            self.alpha = float(RidgeCV(alphas=ALPHAS).fit(x, y).alpha_)
        rng = np.random.RandomState(0)
        self.members = []
        for member in range(ENSEMBLE):
            # Member 0 sees every sample; the others a bootstrap resample (their spread is the
            # per-candidate scale of the conformal interval).
            index = np.arange(len(y)) if member == 0 else rng.randint(0, len(y), len(y))
            fitted = Ridge(alpha=self.alpha).fit(x[index], y[index])
            self.members.append(([float(c) for c in fitted.coef_], float(fitted.intercept_)))

    def _predict_core(self, features: ArchitectureFeatures) -> tuple[float, float]:
        if not self.members:
            return features.macs / (self.base.macs or 1), 1.0
        row = vectorize(self.base, features)
        values = [sum(c * v for c, v in zip(coef, row, strict=True)) + intercept for coef, intercept in self.members]
        ratio = values[0]
        mean = sum(values) / len(values)
        spread = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        return ratio, max(spread / max(abs(ratio), 1e-3), MIN_SCALE)

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "members": [[coef, intercept] for coef, intercept in self.members]}

    def _load_params(self, params: Mapping[str, Any]) -> None:
        self.alpha = float(params["alpha"])
        self.members = [([float(c) for c in coef], float(intercept)) for coef, intercept in params["members"]]
