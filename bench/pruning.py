"""Seconds per plan for copy + apply + ONNX export, on the reference architectures.

Besides the zoo: a BERT-base-like (12 layers, hidden 768, 12 heads, sequence 128, with
``input_ids``/``attention_mask``/``token_type_ids``) and a ViT-S/16-like (12 layers, hidden 384,
6 heads, 224x224) Hugging Face model, randomly initialised from their configs.

For each architecture: build the space once (cpu-ort-fp32 and ampere-trt-fp16, so N:M decisions
exist), then time ``apply`` (deep copy, dependency graph, importance, pruning, N:M masks) and
``export_onnx`` (TorchScript exporter, onnx.checker, comparison with torch) for random plans.

Run by hand: ``.venv/bin/python bench/pruning.py`` (writes docs/benchmarks.md);
``--transformers`` times only the two Hugging Face models, into a section of their own.
"""

from __future__ import annotations

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
from search.pipeline.inputs import ModelInput  # noqa: E402
from search.pipeline.onnx_export import export_onnx  # noqa: E402
from search.pipeline.plan import Plan  # noqa: E402
from search.pipeline.space import apply, build_space  # noqa: E402

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


def main() -> None:
    only_transformers = "--transformers" in sys.argv[1:]
    cases = CASES[3:] if only_transformers else CASES
    profiles = [load_profile("cpu-ort-fp32"), load_profile("ampere-trt-fp16")]
    rng = random.Random(0)
    rows = []
    # Tracing Hugging Face code warns about shape checks turned into constants; the export's
    # comparison with ONNX Runtime (at two batch sizes) is the real check.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
    warnings.filterwarnings("ignore", message=".*aten::index operator.*")
    for label, build in cases:
        model, example = build()
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
        "Runtime comparison with torch (at the batch and at batch + 1: every export has a dynamic "
        "batch axis). The Hugging Face models are pruned by whole heads and FFN channels; their "
        "hidden size is kept (opt-in).\n\n"
        "| architecture | base MMACs | groups | N:M layers | build space s | apply s | export s | per plan s |\n"
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
