"""Seconds per plan for copy + apply + ONNX export, on the reference architectures.

Besides the zoo: a BERT-base-like (12 layers, hidden 768, 12 heads, sequence 128, with
``input_ids``/``attention_mask``/``token_type_ids``) and a ViT-S/16-like (12 layers, hidden 384,
6 heads, 224x224) Hugging Face model, randomly initialised from their configs.

For each architecture: build the space once (cpu-ort-fp32 and ampere-trt-fp16, so N:M decisions
exist), then time ``apply`` (deep copy, dependency graph, importance, pruning, N:M masks) and
``export_onnx`` (TorchScript exporter, onnx.checker, comparison with torch) for random plans.

Run by hand: ``.venv/bin/python bench/pruning.py`` (writes docs/benchmarks.md);
``--transformers`` times only the two Hugging Face models, into a section of their own.

``--compare`` times each plan both ways, interleaved, in one run: "before" is the path of
commit 06f14df (a dependency graph traced on every copy, ``apply(..., retrace=True)``; the export
with onnx.checker, ONNX Runtime at the profile's batch and at batch + 1, and the metadata written
by parsing and re-serializing the model) and "after" is today's (the graph traced once and copied
with the model; ONNX Runtime agreement at the profile's shapes only). ``--runs N`` repeats every
plan N times per path; the table gives the median and the range over all plans and runs, and the
median of the paired before/after ratio. Writes its own section.
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from search.examples.zoo import make_architecture  # noqa: E402
from search.pipeline import onnx_export  # noqa: E402
from search.pipeline.inputs import ModelInput  # noqa: E402
from search.pipeline.onnx_export import export_onnx  # noqa: E402
from search.pipeline.plan import Plan  # noqa: E402
from search.pipeline.space import SearchSpace, apply, build_space  # noqa: E402

PLANS = 5


def _zoo(name: str, resolution: int) -> Callable[[], tuple[nn.Module, ModelInput]]:
    return lambda: make_architecture(name, resolution=resolution)


def _bert_base() -> tuple[nn.Module, ModelInput]:
    transformers: Any = importlib.import_module("transformers")  # a dev dependency, typed loosely
    torch.manual_seed(0)
    config = transformers.BertConfig(num_labels=2)  # BERT-base: 12 x 768, 12 heads, FFN 3072
    model: nn.Module = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def _vit_small() -> tuple[nn.Module, ModelInput]:
    transformers: Any = importlib.import_module("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, image_size=224, patch_size=16, num_labels=1000)
    model: nn.Module = transformers.ViTForImageClassification(config).eval()
    return model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


CASES: list[tuple[str, Callable[[], tuple[nn.Module, Any]]]] = [
    ("ResNet-18 (width 64) @224", _zoo("resnet18-full", 224)),
    ("MobileNetV2-style @64", _zoo("mobilenetv2", 64)),
    ("transformer encoder (2 blocks, 4 heads)", _zoo("transformer", 64)),
    ("BERT-base-like (HF, 12x768, 12 heads) @seq 128", _bert_base),
    ("ViT-S/16-like (HF, 12x384, 6 heads) @224", _vit_small),
]


def _random_plan(space: SearchSpace, rng: random.Random) -> Plan:
    return Plan(
        channels={g.name: rng.choice(g.ratios) for g in space.groups},
        sparsity={s.layer: rng.choice(("dense", *s.patterns)) for s in space.sparsity},
    )


def _timed_plan(model: nn.Module, example: Any, space: SearchSpace, plan: Plan, out: Path,
                *, before: bool) -> tuple[float, float]:
    """Seconds to apply ``plan`` and to export the result, the old way (``before``) or today's."""
    fields = onnx_export._top_level_fields
    start = time.perf_counter()
    pruned = apply(model, example, space, plan, retrace=before)
    applied = time.perf_counter() - start
    if before:  # the metadata written by parsing and re-serializing the model, as at 06f14df
        onnx_export._top_level_fields = lambda _blob: None  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        export_onnx(pruned.model, example, out, dynamic_check=before)
        exported = time.perf_counter() - start
    finally:
        onnx_export._top_level_fields = fields  # type: ignore[assignment]
    return applied, exported


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def compare(cases: list[tuple[str, Callable[[], tuple[nn.Module, Any]]]], plans: int, runs: int,
            command: str) -> None:
    profiles = [load_profile("cpu-ort-fp32"), load_profile("ampere-trt-fp16")]
    rng = random.Random(0)
    rows = []
    for label, build in cases:
        model, example = build()
        space = build_space(model, example, profiles)
        start = time.perf_counter()
        apply(model, example, space, space.dense_plan())  # traces the graph the plans then copy
        trace_s = time.perf_counter() - start
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        ratios = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(plans):
                plan = _random_plan(space, rng)
                for run_index in range(runs):
                    pair = {}
                    for before in ((True, False) if run_index % 2 == 0 else (False, True)):
                        pair[before] = _timed_plan(model, example, space, plan, Path(tmp), before=before)
                        times[before].append(pair[before])
                    ratios.append(sum(pair[True]) / sum(pair[False]))
        cells = []
        for before in (True, False):
            a, e = [t[0] for t in times[before]], [t[1] for t in times[before]]
            cells += [_spread(a), _spread(e), _spread([x + y for x, y in zip(a, e, strict=True)])]
        rows.append(f"| {label} | {trace_s:.2f} | " + " | ".join(cells) + f" | {statistics.median(ratios):.1f}x |")
        print(rows[-1], flush=True)
    body = (
        f"{plans} random plans per architecture, each applied and exported {runs} times per path, the "
        "two paths interleaved (alternating which goes first); seconds as median [min-max] over all "
        "plans and runs. Before: the path of commit 06f14df (torch-pruning's graph traced on every "
        "copy; export with onnx.checker, ONNX Runtime at the profile's batch and at batch + 1, the "
        "example shapes written by re-serializing the model). After: the graph traced once (the "
        "first apply, its seconds in their own column) and copied with each plan's model, MACs "
        "counted on a meta-device copy, and the export checked by ONNX Runtime at the profile's "
        "shapes only (the full check runs on the base model at a search's start and on files handed "
        "out). Both paths use today's N:M masks (ranks counted by comparison, not a sort; the same "
        "masks) and write the file without concatenating a copy of it, so \"before\" is faster than "
        "06f14df was. Results are bit-identical (tests/search_tests/test_replay.py). Run under the "
        "shared benchmark lock; other work on the machine was not otherwise controlled.\n\n"
        "| architecture | first apply (trace) s | before: apply s | before: export s | before: per plan s "
        "| after: apply s | after: export s | after: per plan s | before/after |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
        + "\n\nAims (issue 32): per plan <= 1.5 s for the BERT-base-like and ViT-S/16-like models, "
        "<= 0.5 s for ResNet-18 at 224.\n"
    )
    write_section("pruning-replay", "Pruning and export cost, traced once against traced per plan (bench/pruning.py)",
                  command, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transformers", action="store_true", help="only the Hugging Face models")
    parser.add_argument("--compare", action="store_true", help="before/after, side by side")
    parser.add_argument("--only", nargs="*", default=None, help="case labels starting with these words")
    parser.add_argument("--plans", type=int, default=PLANS)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    only_transformers = args.transformers
    cases = CASES[3:] if only_transformers else CASES
    if args.only:
        cases = [case for case in cases if any(case[0].startswith(word) for word in args.only)]
    # Tracing Hugging Face code warns about shape checks turned into constants; the export's
    # comparison with ONNX Runtime is the real check.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
    warnings.filterwarnings("ignore", message=".*aten::index operator.*")
    if args.compare:
        compare(cases, args.plans, args.runs, ".venv/bin/python bench/pruning.py " + " ".join(sys.argv[1:]))
        return
    profiles = [load_profile("cpu-ort-fp32"), load_profile("ampere-trt-fp16")]
    rng = random.Random(0)
    rows = []
    for label, build in cases:
        model, example = build()
        start = time.perf_counter()
        space = build_space(model, example, profiles)
        apply(model, example, space, space.dense_plan())  # traces the graph every plan then copies
        space_s = time.perf_counter() - start
        apply_s, export_s = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(PLANS):
                plan = _random_plan(space, rng)
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
        "random dense/2:4 per eligible layer). Export = TorchScript exporter + ONNX Runtime "
        "comparison with torch at the profile's shapes; apply copies the dependency graph traced once "
        "per space (in the build column). The Hugging Face models are pruned by whole heads and FFN "
        "channels; their hidden size is kept (opt-in).\n\n"
        "| architecture | base MMACs | groups | N:M layers | build space + trace s | apply s | export s "
        "| per plan s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\nAim: <= 1.0 s per plan.\n"
    )
    if only_transformers:
        write_section("pruning-transformers", "Pruning and export cost, Hugging Face transformers (bench/pruning.py)",
                      ".venv/bin/python bench/pruning.py --transformers", body)
    else:
        write_section("pruning", "Pruning and export cost (bench/pruning.py)",
                      ".venv/bin/python bench/pruning.py", body)


if __name__ == "__main__":
    main()
