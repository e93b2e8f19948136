"""Error without recovery, per N:M criterion at 2:4 and per channel importance at 50% channels.

Three models: the built-in ``digits`` example (trained), the zoo's transformer encoder and a small
Llama built from a ``transformers`` config (both randomly initialised). Fidelity is the relative
output error ``||f'(x) - f(x)|| / ||f(x)||`` of the pruned model against the dense one on held-out
inputs, plus top-1 agreement with the dense model (and digits' top-1 error on its validation set).
Calibration: the first 8 batches of each training loader (``search.pipeline.pruning.CALIBRATION_BATCHES``).
The random models' loaders label each input with the dense model's own top-1 prediction, so
gradient importances see a meaningful loss.

2:4 goes on every N:M-eligible layer of the space for ampere-trt-fp16 (the output layer keeps its
weights); 50% channels is ``SearchSpace.uniform_plan(0.5)`` (every group, kv heads included, at
half its width), with magnitude N:M off.

Run by hand: ``.venv/bin/python bench/criteria.py`` (writes docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from search.config import cache_dir  # noqa: E402
from search.examples.digits import digits  # noqa: E402
from search.examples.zoo import TinyTransformer, tiny_llama, token_ids  # noqa: E402
from search.pipeline.plan import Plan  # noqa: E402
from search.pipeline.pruning import CALIBRATION_BATCHES  # noqa: E402
from search.pipeline.recovery import adapt_batchnorm, has_batchnorm  # noqa: E402
from search.pipeline.space import SearchSpace, apply, build_space  # noqa: E402

CRITERIA = ("magnitude", "wanda", "sparsegpt")
IMPORTANCES = ("magnitude", "taylor", "llm-pruner", "movement")
REPEATS = 3  # apply() timings: median of this many
READING = (
    "Reading: SparseGPT's weight updates are what pays on every model here. Wanda's gains in the papers "
    "come from the outlier features of trained LLMs' activations; the random models have none. On the "
    "trained CNN, Wanda calibrated layer by layer (as its paper does) read inputs that earlier sparse "
    "layers had pushed through stale BatchNorm statistics: error 0.70 against magnitude's 0.09 in the "
    "2026-11-23 table. Since 2026-12-01 Wanda reads the dense model's inputs on models with BatchNorm: "
    "its raw error is still above magnitude's, but after adaptive BN, which every trial starts with, it "
    "is half of magnitude's (SparseGPT lower still). Movement scores now accumulate while a scratch copy "
    "fine-tunes one step per calibration batch; they give the lowest raw relative error at 50% channels on "
    "digits but not the lowest error after adaptive BN. The times of this run were taken while other runs "
    "loaded the 2 cores (load average about 10): compare them within a row group only.\n"
)


@dataclass
class Case:
    label: str
    model: nn.Module
    example: torch.Tensor
    train: list[tuple[torch.Tensor, torch.Tensor]] | object
    held_out: torch.Tensor
    error: Callable[[nn.Module], float] | None = None


def _self_labelled(model: nn.Module, inputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        return [(x, model(x).argmax(dim=1)) for x in inputs]


def _cases() -> list[Case]:
    bundle = digits(cache_dir=cache_dir())
    held = torch.cat([cast(torch.Tensor, x) for x, _ in bundle.val_loader])  # digits: one tensor per batch
    cases = [Case("digits (trained CNN, 360 val images)", bundle.model, cast(torch.Tensor, bundle.example_input),
                  bundle.train_loader,
                  held, lambda m: bundle.error_fn(m, bundle.val_loader))]
    torch.manual_seed(0)
    encoder = TinyTransformer().eval()
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(32, 8, 16, generator=generator) for _ in range(CALIBRATION_BATCHES + 1)]
    cases.append(Case("zoo transformer (random init)", encoder, inputs[0][:1].clone(),
                      _self_labelled(encoder, inputs[1:]), inputs[0]))
    llama = tiny_llama(hidden=128, layers=4, heads=8, kv_heads=2, intermediate=352, vocab=512)
    ids = [token_ids(8, 64, vocab=512, seed=10 + i) for i in range(CALIBRATION_BATCHES + 1)]
    cases.append(Case("Llama 4x128, 8 q / 2 kv heads (random init)", llama, ids[0][:1].clone(),
                      _self_labelled(llama, ids[1:]), ids[0]))
    return cases


def _fidelity(model: nn.Module, dense: torch.Tensor, held: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(held)
    rel = float((out - dense).norm() / dense.norm())
    agree = float((out.argmax(dim=1) == dense.argmax(dim=1)).float().mean())
    return rel, agree


def _error_after_adaptive_bn(case: Case, model: nn.Module) -> str:
    if case.error is None or not has_batchnorm(model):
        return "-"
    adapt_batchnorm(model, case.train, count=2)  # type: ignore[arg-type]
    return f"{case.error(model):.4f}"


def _timed_apply(case: Case, space: SearchSpace, plan: Plan, **options: Any) -> tuple[nn.Module, float]:
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        pruned = apply(case.model, case.example, space, plan, calibration=case.train, **options)
        seconds.append(time.perf_counter() - start)
    return pruned.model, statistics.median(seconds)


def main() -> None:
    profile = load_profile("ampere-trt-fp16")
    nm_rows, channel_rows, dense_errors = [], [], []
    for case in _cases():
        if case.error:
            dense_errors.append(f"{case.label.split(' ')[0]} {case.error(case.model):.4f}")
        space = build_space(case.model, case.example, [profile])
        with torch.no_grad():
            dense = case.model(case.held_out)
        plan = Plan(sparsity={s.layer: "2:4" for s in space.sparsity})
        layers = len(plan.sparsity)
        base_s = None
        magnitude_rel = None
        for criterion in CRITERIA:
            model, seconds = _timed_apply(case, space, plan, nm_criterion=criterion)
            rel, agree = _fidelity(model, dense, case.held_out)
            base_s = seconds if base_s is None else base_s
            magnitude_rel = rel if magnitude_rel is None else magnitude_rel
            cut = "-" if criterion == "magnitude" else f"{100 * (1 - rel / magnitude_rel):+.0f}%"
            err = f"{case.error(model):.4f}" if case.error else "-"
            bn_err = _error_after_adaptive_bn(case, model)
            per_layer_ms = 1000 * max(0.0, seconds - base_s) / layers
            nm_rows.append(f"| {case.label} | {criterion} | {layers} | {rel:.4f} | {cut} | {agree:.3f} | {err} | "
                           f"{bn_err} | {seconds:.2f} | {per_layer_ms:.0f} |")
            print(nm_rows[-1], flush=True)
        half = space.uniform_plan(0.5)
        for importance in IMPORTANCES:
            model, seconds = _timed_apply(case, space, half, importance=importance)
            rel, agree = _fidelity(model, dense, case.held_out)
            err = f"{case.error(model):.4f}" if case.error else "-"
            bn_err = _error_after_adaptive_bn(case, model)
            channel_rows.append(f"| {case.label} | {importance} | {len(space.groups)} | {rel:.4f} | {agree:.3f} | "
                                f"{err} | {bn_err} | {seconds:.2f} |")
            print(channel_rows[-1], flush=True)
    body = (
        "No recovery fine-tuning. `rel. error` = ||pruned(x) - dense(x)|| / ||dense(x)|| on held-out inputs "
        "(digits: its validation set; the random models: a batch not used for calibration); `top-1 agree` = "
        "share of outputs (tokens for the Llama) whose top-1 matches the dense model's; `error` = digits' "
        f"top-1 error (dense: {', '.join(dense_errors)}); `error, adaptive BN` = the same after BatchNorm statistics "
        "are re-estimated on 2 training batches, as every trial's recovery starts (models with BatchNorm only). "
        f"Calibration: {CALIBRATION_BATCHES} training batches. "
        "Times are medians "
        f"of {REPEATS} `apply` calls (deep copy, dependency graph, importance, pruning, masks) on 1 thread; "
        "`ms / layer` = the criterion's time over magnitude's, per N:M layer (calibration forwards + "
        "statistics + mask/update).\n\n"
        "### 2:4 on every eligible layer, per N:M criterion\n\n"
        "| model | criterion | 2:4 layers | rel. error | vs magnitude | top-1 agree | error | error, adaptive BN | "
        "apply s | ms / layer |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(nm_rows) + "\n\n"
        "### 50% of every group's channels (heads, kv heads), per importance\n\n"
        "| model | importance | groups | rel. error | top-1 agree | error | error, adaptive BN | apply s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(channel_rows) + "\n\n" + READING
    )
    write_section("criteria", "Pruning criteria without recovery (bench/criteria.py)",
                  ".venv/bin/python bench/criteria.py", body)


if __name__ == "__main__":
    main()
