"""The latency-model contract: held-out numbers computed from folds the model never saw, conformal
intervals, versioned JSON states, and the lookup table's layer graphs timed on ONNX Runtime.

Where a test needs many (features, ratio) pairs quickly it uses a *synthetic* ratio law (named so):
those tests check the regression and the statistics, not a latency figure. Real latencies are timed
by the lookup-table test here and by tests/search_tests/test_latency_model.py."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest

from hardware_profiles import HardwareProfile
from latency_models import registry
from latency_models.predictors import (
    ArchitectureFeatures,
    LatencyModelError,
    LayerFeatures,
    LearnedModel,
    LookupTableModel,
    from_state,
    held_out_error,
    layer_graph,
    time_layers,
    variants,
)
from latency_models.predictors.contract import conformal_quantile
from latency_models.predictors.lookup import resized


def _base() -> ArchitectureFeatures:
    layers = [
        LayerFeatures("conv1", "conv", 3, 32, 1, (3, 3), (1, 1), (1, 1), (16, 16), (16, 16), 0, 0),
        LayerFeatures("conv2", "conv", 32, 64, 1, (3, 3), (2, 2), (1, 1), (16, 16), (8, 8), 0, 0),
        LayerFeatures("fc", "linear", 64, 10, 1, (1, 1), (1, 1), (0, 0), (1, 1), (1, 1), 0, 0),
    ]
    return ArchitectureFeatures(tuple(resized(layer, layer.in_channels, layer.out_channels) for layer in layers))


def _plan(base: ArchitectureFeatures, rng: random.Random) -> ArchitectureFeatures:
    first, second = rng.choice((8, 16, 24, 32)), rng.choice((16, 32, 48, 64))
    c1, c2, fc = base.layers
    return ArchitectureFeatures((resized(c1, 3, first), resized(c2, first, second), resized(fc, second, 10)))


def _synthetic_ratio(base: ArchitectureFeatures, features: ArchitectureFeatures, noise: float) -> float:
    """A synthetic law (not a latency measurement): a fixed share plus MAC fractions, with noise."""
    weights = {"conv1": 0.2, "conv2": 0.5, "fc": 0.1}
    by_name = base.by_name()
    value = 0.2 + sum(weights[layer.name] * layer.macs / by_name[layer.name].macs for layer in features.layers)
    return value * (1 + noise)


def _samples(count: int, seed: int = 0, noise: float = 0.01) -> list[tuple[ArchitectureFeatures, float]]:
    base, rng = _base(), random.Random(seed)
    out = []
    for _ in range(count):
        features = _plan(base, rng)
        out.append((features, _synthetic_ratio(base, features, rng.uniform(-noise, noise))))
    return out


def test_learned_model_recovers_a_linear_law_and_round_trips_through_json() -> None:
    base = _base()
    model = LearnedModel(base)
    held = model.fit(_samples(40))
    assert held is not None and held.n == 40
    assert held.within_5 == 1.0 and held.mape < 0.02
    test = _samples(30, seed=7, noise=0.0)
    for features, ratio in test:
        prediction = model.predict(features)
        assert prediction.ratio == pytest.approx(ratio, rel=0.03)
        assert prediction.low < prediction.ratio < prediction.high
    state = json.loads(json.dumps(model.to_state()))
    loaded = from_state(state)
    assert isinstance(loaded, LearnedModel) and loaded.held_out == model.held_out
    assert len(loaded.samples) == 40
    for features, _ in test:
        assert loaded.predict(features) == model.predict(features)


def test_held_out_error_is_computed_from_out_of_fold_predictions() -> None:
    base = _base()
    data = _samples(25, seed=3, noise=0.04)
    model = LearnedModel(base)
    held = model.fit(data, folds=5)
    assert held is not None
    # Recompute by hand: every fifth sample predicted by a model fitted on the others.
    errors = []
    for fold in range(5):
        other = LearnedModel(base)
        other._fit_core([(base, 1.0), *(s for i, s in enumerate(data) if i % 5 != fold)])
        errors += [abs(other._predict_core(f)[0] / r - 1) for i, (f, r) in enumerate(data) if i % 5 == fold]
    assert held.mape == pytest.approx(sum(errors) / len(errors))
    assert held.worst == pytest.approx(max(errors))
    assert held.within_5 == pytest.approx(sum(e <= 0.05 for e in errors) / len(errors))
    # The fitted model on fresh data: a test set it never saw.
    test = held_out_error(model, _samples(50, seed=11, noise=0.04))
    assert test.n == 50 and 0 < test.mape < 0.1


def test_too_few_samples_give_no_held_out_error_and_an_infinite_interval() -> None:
    model = LearnedModel(_base())
    assert model.fit(_samples(3)) is None
    prediction = model.predict(_samples(1, seed=5)[0][0])
    assert math.isinf(prediction.high) and math.isinf(prediction.rel_halfwidth)


def test_conformal_quantile() -> None:
    scores = [float(i) for i in range(1, 20)]  # 19 scores: rank ceil(20 * 0.9) = 18
    assert conformal_quantile(scores, 0.9) == 18.0
    assert math.isinf(conformal_quantile(scores[:5], 0.9))


def test_bad_states_and_samples_are_refused() -> None:
    state = LearnedModel(_base()).to_state()
    with pytest.raises(LatencyModelError, match="state version 99"):
        from_state(state | {"version": 99})
    with pytest.raises(LatencyModelError, match="unknown latency model kind 'nope'"):
        from_state(state | {"kind": "nope"})
    with pytest.raises(LatencyModelError, match="positive finite"):
        LearnedModel(_base()).fit([(_base(), float("nan"))])


def test_lookup_table_times_layer_graphs_on_onnx_runtime(fast_profile: HardwareProfile) -> None:
    base = _base()
    layers = variants(base, {"conv2": ((16, 32), (32, 64))})
    assert len(layers) == 2 + 4  # conv1 and fc at base widths, conv2 at 2 x 2 widths
    with registry.get(fast_profile.backend)(fast_profile) as backend:
        table = time_layers(backend, layers)
    assert set(table) == {f"{v.name}|{v.in_channels}|{v.out_channels}|dense" for v in layers}
    assert all(value > 0 for value in table.values())
    lut = LookupTableModel(base, table)
    assert lut.raw_ratio(base) == pytest.approx(1.0)
    # An untimed width falls back to the nearest timed shape scaled by MACs.
    c1, c2, fc = base.layers
    narrow = ArchitectureFeatures((resized(c1, 3, 24), resized(c2, 24, 48), resized(fc, 48, 10)))
    assert 0 < lut.raw_ratio(narrow) < 1
    again = from_state(json.loads(json.dumps(lut.to_state())))
    assert isinstance(again, LookupTableModel) and again.raw_ratio(narrow) == lut.raw_ratio(narrow)
    model = layer_graph(replace(c2, nm="2:4"))
    assert model.graph.node[0].op_type == "Conv"
