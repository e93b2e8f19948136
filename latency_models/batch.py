"""A lookup table's measurements as one batch: every prunable layer alone, as a one-node ONNX
graph (``layer_graph``), and whole-model plans, each timed paired with the base model.

The local ``latency-model build`` and a remote agent (one job, one lease) run the same
``measure_batch`` on their own backend, so a table built on a device through the hub holds the
same figures, under the same keys, as one built here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from latency_models.base import LatencyBackend
from latency_models.errors import LatencyError, MeasurementError
from latency_models.predictors.features import LayerFeatures
from latency_models.predictors.lookup import entry_key, time_layers


class BatchStopped(LatencyError):
    """The batch was abandoned part-way (its lease lost, or the agent told to give it back)."""


@dataclass(frozen=True, slots=True)
class PairedFigure:
    """A plan timed interleaved with the base model: its median and its ratio to the base."""

    median_us: float
    ratio: float
    ratio_ci: tuple[float, float]


@dataclass(frozen=True, slots=True)
class BatchFigures:
    """What a batch measured, in the order it was asked: each layer's median alone (us), and
    each plan's paired figures."""

    layers_us: tuple[float, ...]
    plans: tuple[PairedFigure, ...]


def measure_batch(backend: LatencyBackend, base: Path, layers: Sequence[LayerFeatures], plans: Sequence[Path], *,
                  progress: Callable[[int], None] | None = None,
                  stop: Callable[[], bool] | None = None) -> BatchFigures:
    """Time each layer alone, then each plan paired with ``base``, on an open ``backend``.

    ``progress(n)`` is told how many of ``len(layers) + len(plans)`` are done; ``stop()`` is asked
    before each measurement and, when true, abandons the batch (``BatchStopped``).
    """
    def step(done: int) -> None:
        if progress is not None:
            progress(done)
        if stop is not None and stop():
            raise BatchStopped(f"batch abandoned after {done} of {len(layers) + len(plans)} measurements")

    step(0)
    table = time_layers(backend, layers, progress=step)
    layers_us = [table[entry_key(layer)] for layer in layers]
    figures: list[PairedFigure] = []
    for plan in plans:
        result = backend.measure_paired(plan, base).result()
        if result.ratio is None or result.ratio_ci is None:
            raise MeasurementError(f"paired measurement of {plan.name} gave no ratio to the base model")
        figures.append(PairedFigure(result.measurement.median_us, result.ratio, result.ratio_ci))
        step(len(layers) + len(figures))
    return BatchFigures(tuple(layers_us), tuple(figures))
