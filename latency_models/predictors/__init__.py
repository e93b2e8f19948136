"""Latency models that predict: a per-layer lookup table and a learned ridge ensemble, behind one
contract (``LatencyModel``), fed plain-data architecture features. No torch, optuna or search."""

from __future__ import annotations

from latency_models.predictors.contract import (
    COVERAGE,
    STATE_VERSION,
    HeldOutError,
    LatencyModel,
    LatencyModelError,
    Prediction,
    Sample,
    from_state,
    held_out_error,
    kinds,
)
from latency_models.predictors.features import ArchitectureFeatures, FeatureError, LayerFeatures
from latency_models.predictors.learned import LearnedModel, vectorize
from latency_models.predictors.lookup import LookupTableModel, layer_graph, time_layers, variants

__all__ = [
    "COVERAGE",
    "STATE_VERSION",
    "ArchitectureFeatures",
    "FeatureError",
    "HeldOutError",
    "LatencyModel",
    "LatencyModelError",
    "LayerFeatures",
    "LearnedModel",
    "LookupTableModel",
    "Prediction",
    "Sample",
    "from_state",
    "held_out_error",
    "kinds",
    "layer_graph",
    "time_layers",
    "variants",
    "vectorize",
]
