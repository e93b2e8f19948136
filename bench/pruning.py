"""Seconds per plan for copy + apply + ONNX export, on the reference architectures.

For each architecture: build the space once (cpu-ort-fp32 and ampere-trt-fp16, so N:M decisions
exist), then time ``apply`` (deep copy, dependency graph, importance, pruning, N:M masks) and
``export_onnx`` (TorchScript exporter, onnx.checker, comparison with torch) for random plans.

Run by hand: ``.venv/bin/python bench/pruning.py`` (writes docs/benchmarks.md).
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from search.examples.zoo import make_architecture  # noqa: E402
from search.pipeline.onnx_export import export_onnx  # noqa: E402
from search.pipeline.plan import Plan  # noqa: E402
from search.pipeline.space import apply, build_space  # noqa: E402

PLANS = 5
CASES = [("ResNet-18 (width 64) @224", "resnet18-full", 224), ("MobileNetV2-style @64", "mobilenetv2", 64),
         ("transformer encoder (2 blocks, 4 heads)", "transformer", 0)]


def main() -> None:
    profiles = [load_profile("cpu-ort-fp32"), load_profile("ampere-trt-fp16")]
    rng = random.Random(0)
    rows = []
    for label, name, resolution in CASES:
        model, example = make_architecture(name, resolution=resolution or 64)
        start = time.perf_counter()
        space = build_space(model, example, profiles)
        space_s = time.perf_counter() - start
        apply_s, export_s = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(PLANS):
                plan = Plan(
                    channels={g.name: rng.choice(g.ratios) for g in space.groups},
                    sparsity={s.layer: rng.choice(("dense", *s.patterns)) for s in space.sparsity},
                )
                start = time.perf_counter()
                pruned = apply(model, example, space, plan)
                apply_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                export_onnx(pruned.model, example, Path(tmp))
                export_s.append(time.perf_counter() - start)
        a, e = statistics.median(apply_s), statistics.median(export_s)
        rows.append(f"| {label} | {space.base_macs / 1e6:.1f} | {len(space.groups)} | "
                    f"{len(space.sparsity)} | {space_s:.2f} | {a:.2f} | {e:.2f} | {a + e:.2f} |")
        print(rows[-1], flush=True)
    body = (
        f"Median over {PLANS} random plans per architecture (random keep-ratios from the grid and "
        "random dense/2:4 per eligible layer). Export = TorchScript exporter + onnx.checker + ONNX "
        "Runtime comparison with torch.\n\n"
        "| architecture | base MMACs | groups | N:M layers | build space s | apply s | export s | per plan s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\nAim: <= 1.0 s per plan.\n"
    )
    write_section("pruning", "Pruning and export cost (bench/pruning.py)", ".venv/bin/python bench/pruning.py", body)


if __name__ == "__main__":
    main()
