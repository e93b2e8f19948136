"""Pareto fronts over stored trials: error against the latency on one target."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from search.study.confirmation import Session


@dataclass(frozen=True, slots=True)
class TrialPoint:
    """One completed trial's figures, read back from Optuna's user attributes.

    ``latency_us`` is the figure to show: the ratio to the base model (confirmed where a
    confirmation exists, else the first session's) times the base model's current latency.
    """

    trial: int
    error: float
    latency_us: Mapping[str, float]
    macs: int
    params: int
    reward: float | None
    feasible: bool
    plan: Mapping[str, Any] = field(default_factory=dict)
    signature: str = ""
    artifact_sha256: str = ""
    ratio: Mapping[str, float] = field(default_factory=dict)
    ratio_interval: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    confirmed: Mapping[str, bool] = field(default_factory=dict)
    first_session: Mapping[str, Session] = field(default_factory=dict)
    stage_s: Mapping[str, float] = field(default_factory=dict)
    constraints: Mapping[str, float] = field(default_factory=dict)
    kept: Mapping[str, int] = field(default_factory=dict)
    # Targets whose first figure is a prediction (hybrid/predicted latency), not a session.
    predicted: Mapping[str, bool] = field(default_factory=dict)
    model_device: str = "cpu"  # where its recovery ran: a replay runs on the same kind of device
    # Later trials that reached the same architecture with the same figures (see pareto_front).
    same_as: tuple[int, ...] = ()

    @property
    def accuracy(self) -> float:
        return 1.0 - self.error

    @property
    def violated(self) -> list[str]:
        """The constraints this trial breaks (positive values), by name."""
        return sorted(name for name, value in self.constraints.items() if value > 0)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` is no worse than ``b`` in both coordinates and better in one (both minimised)."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def pareto_front(points: Sequence[TrialPoint], target: str) -> list[TrialPoint]:
    """The non-dominated feasible points on (error, latency on ``target``), by latency.

    An architecture is on a front once: trials that reached the same one (equal signatures)
    with identical figures are one point, the first trial's, naming the others in ``same_as``.
    Other points with identical figures are all kept (none dominates another).
    """
    return _one_per_architecture(_non_dominated(points, target), target)


def _one_per_architecture(front: list[TrialPoint], target: str) -> list[TrialPoint]:
    first: dict[tuple[str, float, float], TrialPoint] = {}
    for point in sorted(front, key=lambda p: p.trial):
        key = (point.signature or f"trial {point.trial}", point.error, point.latency_us[target])
        if key in first:
            earlier = first[key]
            first[key] = replace(earlier, same_as=(*earlier.same_as, point.trial, *point.same_as))
        else:
            first[key] = point
    return sorted(first.values(), key=lambda p: (p.latency_us[target], p.error))


def _non_dominated(points: Sequence[TrialPoint], target: str) -> list[TrialPoint]:
    """O(n log n): sorted by error then latency, a point is on the front when its latency beats
    every point before it that has strictly lower error, or ties the best on equal error."""
    candidates = sorted(
        (p for p in points if p.feasible and target in p.latency_us),
        key=lambda p: (p.error, p.latency_us[target]),
    )
    front: list[TrialPoint] = []
    best_latency = float("inf")
    group_error: float | None = None
    group_best = float("inf")
    for point in candidates:
        latency = point.latency_us[target]
        if point.error != group_error:
            best_latency = min(best_latency, group_best)
            group_error, group_best = point.error, latency
        if latency < best_latency and latency <= group_best:
            front.append(point)
    return sorted(front, key=lambda p: (p.latency_us[target], p.error))
