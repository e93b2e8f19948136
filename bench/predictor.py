"""Latency models on held-out random plans: how close a prediction comes to the measured ratio.

For each model: N_TRAIN + N_TEST random plans of its cpu-ort-fp32 space (seeded), each pruned,
exported and measured paired with the base model (the ratio the search stores). The learned model
(ridge ensemble) and gradient-boosted trees on the same rows are fitted on the training plans and
scored on the test plans (share within +-5% / +-10%, MAPE, worst case), with fit and prediction
times; the conformal interval's coverage on the test plans is reported too. With ``--lut`` the
lookup table is built (every layer timed at every width) and scored the same way.

Run by hand on an otherwise idle machine, e.g.
``.venv/bin/python bench/predictor.py --models digits resnet18-full --train 40 --test 100``
(writes docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from latency_models import registry  # noqa: E402
from latency_models.predictors import (  # noqa: E402
    LatencyModel,
    LearnedModel,
    LookupTableModel,
    Sample,
    held_out_error,
    time_layers,
    variants,
    vectorize,
)
from search.config import cache_dir  # noqa: E402
from search.pipeline.features import architecture_features  # noqa: E402
from search.pipeline.onnx_export import export_onnx  # noqa: E402
from search.pipeline.space import apply, build_space  # noqa: E402

LABELS = {"digits": "digits example (16x16)", "resnet18-full": "ResNet-18 @224", "mobilenetv2": "MobileNetV2 @224"}


def _model(name: str) -> tuple[Any, Any]:
    if name == "digits":
        from search.examples import load_bundle

        bundle = load_bundle("digits", cache_dir=cache_dir())
        return bundle.model, bundle.example_input
    from search.examples.zoo import make_architecture

    return make_architecture(name, resolution=224)


def _measure_plans(name: str, count: int, seed: int) -> tuple[Any, list[Sample], Any, Any, float]:
    profile = load_profile("cpu-ort-fp32")
    model, example = _model(name)
    space = build_space(model, example, [profile])
    base = architecture_features(model, example)
    rng = random.Random(seed)
    samples: list[Sample] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, registry.get(profile.backend)(profile) as backend:
        base_artifact = export_onnx(model, example, Path(tmp) / "base")
        for index in range(count):
            pruned = apply(model, example, space, space.random_plan(rng))
            artifact = export_onnx(pruned.model, example, Path(tmp) / "plans")
            paired = backend.measure_paired(artifact.path, base_artifact.path)
            samples.append((architecture_features(pruned.model, example, pruned.patterns), paired.ratio))
            artifact.path.unlink()
            print(f"{name}: plan {index + 1}/{count} ratio {paired.ratio:.4f}", file=sys.stderr, flush=True)
    return base, samples, space, (model, example), time.perf_counter() - started


def _score(model: LatencyModel, train: list[Sample], test: list[Sample]) -> dict[str, float]:
    started = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    predictions = [model.predict(f) for f, _ in test]
    predict_ms = 1000 * (time.perf_counter() - started) / len(test)
    held = held_out_error(model, test)
    covered = sum(p.low <= r <= p.high for p, (_, r) in zip(predictions, test, strict=True)) / len(test)
    return {"within_5": held.within_5, "within_10": held.within_10, "mape": held.mape, "worst": held.worst,
            "fit_s": fit_s, "predict_ms": predict_ms, "coverage": covered}


def _score_trees(base: Any, train: list[Sample], test: list[Sample]) -> dict[str, float]:
    from sklearn.ensemble import HistGradientBoostingRegressor

    x = [vectorize(base, f) for f, _ in train]
    y = [r for _, r in train]
    started = time.perf_counter()
    trees = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, min_samples_leaf=3,
                                          random_state=0).fit(x, y)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    predicted = trees.predict([vectorize(base, f) for f, _ in test])
    predict_ms = 1000 * (time.perf_counter() - started) / len(test)
    errors = [abs(p / r - 1) for p, (_, r) in zip(predicted, test, strict=True)]
    return {"within_5": sum(e <= 0.05 for e in errors) / len(errors),
            "within_10": sum(e <= 0.10 for e in errors) / len(errors), "mape": statistics.fmean(errors),
            "worst": max(errors), "fit_s": fit_s, "predict_ms": predict_ms, "coverage": float("nan")}


def _row(label: str, kind: str, n_train: int, n_test: int, s: dict[str, float]) -> str:
    coverage = "-" if s["coverage"] != s["coverage"] else f"{100 * s['coverage']:.0f}%"
    return (f"| {label} | {kind} | {n_train} | {n_test} | {100 * s['within_5']:.1f}% | {100 * s['within_10']:.1f}% | "
            f"{100 * s['mape']:.2f}% | {100 * s['worst']:.1f}% | {coverage} | {s['fit_s']:.2f} | "
            f"{s['predict_ms']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18-full", "mobilenetv2"])
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--lut", nargs="*", default=["digits"], help="models to build a lookup table for")
    args = parser.parse_args()
    profile = load_profile("cpu-ort-fp32")
    rows, notes = [], []
    for name in args.models:
        base, samples, space, _, measure_s = _measure_plans(name, args.train + args.test, seed=1)
        train, test = samples[: args.train], samples[args.train:]
        label = LABELS.get(name, name)
        notes.append(f"{label}: {len(samples)} plans measured in {measure_s:.0f} s "
                     f"({measure_s / len(samples):.2f} s a plan: prune, export, paired measurement)")
        for n_train in sorted({min(20, args.train), args.train}):
            rows.append(_row(label, "learned (ridge ensemble)", n_train, len(test),
                             _score(LearnedModel(base), train[:n_train], test)))
            rows.append(_row(label, "gradient-boosted trees", n_train, len(test),
                             _score_trees(base, train[:n_train], test)))
        if name in args.lut:
            widths = {k: (ins or (base.by_name()[k].in_channels,), outs or (base.by_name()[k].out_channels,))
                      for k, (ins, outs) in space.layer_widths().items() if k in base.by_name()}
            layers = variants(base, widths)
            started = time.perf_counter()
            with registry.get(profile.backend)(profile) as backend:
                table = time_layers(backend, layers)
            table_s = time.perf_counter() - started
            notes.append(f"{label}: lookup table of {len(table)} layer shapes timed in {table_s:.0f} s")
            for n_train in sorted({min(20, args.train), args.train}):
                rows.append(_row(label, "lookup table + linear correction", n_train, len(test),
                                 _score(LookupTableModel(base, table), train[:n_train], test)))
    header = ("| model | predictor | train plans | test plans | within +-5% | within +-10% | MAPE | worst | "
              "90% interval coverage | fit s | predict ms/plan |\n|---|---|---|---|---|---|---|---|---|---|---|")
    body = header + "\n" + "\n".join(rows) + "\n\n" + "\n".join(f"* {n}" for n in notes) + "\n"
    command = (f".venv/bin/python bench/predictor.py --models {' '.join(args.models)} "
               f"--train {args.train} --test {args.test} --lut {' '.join(args.lut)}")
    write_section("predictor-" + "-".join(args.models), "Latency predictors on held-out random plans (cpu-ort-fp32): "
                  + ", ".join(LABELS.get(m, m) for m in args.models), command, body)
    print(body)


if __name__ == "__main__":
    main()
