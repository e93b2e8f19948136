"""Repeatability and cost of latency measurement with the ONNX Runtime backend.

For a sub-millisecond, a ~2 ms and a ~10 ms CNN: five repeated measurements, unpaired (CV of the
medians) and paired against a 75%-width variant (CV of the ratios), and the wall-clock seconds per
measurement including session creation, all with the default ``cpu-ort-fp32`` settings.

Run by hand: ``.venv/bin/python bench/measurement.py`` (writes docs/benchmarks.md).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from latency_models import coefficient_of_variation, registry  # noqa: E402

REPEATS = 5


def convnet(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers).eval()


# (label, width, depth, input resolution): sized for ~0.3 ms, ~2 ms and ~10 ms on one core.
MODELS = [("sub-ms", 16, 2, 32), ("~2 ms", 32, 3, 64), ("~10 ms", 64, 4, 80)]


def export(model: nn.Module, resolution: int, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, resolution, resolution),), str(path), dynamo=False)
    return path


def main() -> None:
    profile = load_profile("cpu-ort-fp32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, registry.get(profile.backend)(profile) as backend:
        for label, width, depth, res in MODELS:
            model = export(convnet(width, depth), res, Path(tmp) / f"{width}.onnx")
            variant = export(convnet(width * 3 // 4, depth), res, Path(tmp) / f"{width}v.onnx")
            medians, seconds = [], []
            for _ in range(REPEATS):
                start = time.perf_counter()
                medians.append(backend.measure(model).median_us)
                seconds.append(time.perf_counter() - start)
            ratios, paired_seconds = [], []
            for _ in range(REPEATS):
                start = time.perf_counter()
                ratios.append(backend.measure_paired(variant, model).ratio)
                paired_seconds.append(time.perf_counter() - start)
            rows.append(
                f"| {label} | {sum(medians) / REPEATS / 1000:.3f} | "
                f"{100 * coefficient_of_variation(medians):.2f}% | {sum(seconds) / REPEATS:.2f} | "
                f"{sum(ratios) / REPEATS:.3f} | {100 * coefficient_of_variation(ratios):.2f}% | "
                f"{sum(paired_seconds) / REPEATS:.2f} |"
            )
            print(rows[-1], flush=True)
    body = (
        f"Profile `cpu-ort-fp32` as shipped ({profile.threads} thread, warm-up "
        f"{profile.warmup.runs} runs/{profile.warmup.min_seconds} s, stop at ±"
        f"{100 * profile.repeat.target_rel_precision:g}% median CI or {profile.repeat.max_seconds} s). "
        f"{REPEATS} repeats each; paired = 75%-width variant timed interleaved with the model.\n\n"
        "| model | median ms | CV of medians | s / measurement | paired ratio | CV of ratios | s / paired |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Aim: CV <= 2% for the paired ratio on models of 1 ms and more; <= 3 s per measurement.\n"
    )
    write_section("measurement", "Latency measurement repeatability (bench/measurement.py)",
                  ".venv/bin/python bench/measurement.py", body)


if __name__ == "__main__":
    main()
