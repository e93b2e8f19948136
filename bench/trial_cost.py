"""Where a trial's time goes, at real model sizes: seconds per stage of one trial.

Stages, as a search runs them (search.study.objective): apply (prune a copy of the base; the
dependency graph is traced once per space, its seconds in their own column), adaptive batch-norm
(``bn_batches`` forward passes, models with BatchNorm only), each fine-tuning step (AdamW,
forward, backward, step: the default recovery takes 30), score (the error on validation
batches), export (ONNX, checked by ONNX Runtime at the profile's shapes) and measure (the paired
measurement against the base on the cpu-ort-fp32 profile: ONNX Runtime, one thread, the
profile's own stopping rule).

Models (random weights: the cost does not depend on them; random inputs and labels likewise):
ResNet-50 and MobileNetV2 (torchvision's layouts, written out here: torchvision is not a
dependency) at 224x224, a BERT-base-like and a
ViT-S/16-like Hugging Face model (as bench/pruning.py builds them) and a Llama-style decoder of
about 100M parameters (hidden 768, 12 layers, 12 query and 4 key/value heads, MLP 2048,
vocabulary 16000, eager attention). Each is pruned with the uniform plan at keep-ratio 0.5.

Model work runs with ``--threads`` torch threads (1 and 2 by default) on ``--device`` (cpu; cuda
moves the model work, not the measurement, to the GPU and names it); apply and export run where
a search runs them. The fine-tuning steps, validation batches and batch sizes are small enough
to keep one run under about 10 minutes on 2 shared cores; the table says what ran, and the
"trial s" column adds 30 fine-tuning steps at the measured median step (the default recovery)
to the other stages. Results accumulate in bench/results/trial_cost.json, one entry per
(model, device, threads); every run rewrites the docs/benchmarks.md section from all of them.

Run by hand, one model per run, under the shared lock:
``flock /work/heavy.lock .venv/bin/python bench/trial_cost.py --model resnet50``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402
from pruning import _bert_base, _vit_small  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from latency_models import registry  # noqa: E402
from latency_models.base import cpu_name  # noqa: E402
from search.config import RecoverySettings  # noqa: E402
from search.examples.zoo import tiny_llama, token_ids  # noqa: E402
from search.pipeline.bundle import ModelBundle, classification_error  # noqa: E402
from search.pipeline.device import ModelDevice  # noqa: E402
from search.pipeline.inputs import ModelInput, primary, rebuild, run, tensors  # noqa: E402
from search.pipeline.onnx_export import export_onnx  # noqa: E402
from search.pipeline.recovery import adapt_batchnorm, fine_tune, has_batchnorm  # noqa: E402
from search.pipeline.space import apply, build_space  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "trial_cost.json"
DEFAULT_STEPS = RecoverySettings().steps
Batch = tuple[ModelInput, torch.Tensor]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class _Bottleneck(nn.Module):
    """torchvision's ResNet-50 block: 1x1, 3x3 (stride here), 1x1 x4, projection when shapes change."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, width, 1), _conv_bn(width, width, 3, stride),
                                  _conv_bn(width, width * 4, 1, act=False))
        self.skip = _conv_bn(cin, width * 4, 1, stride, act=False) if stride != 1 or cin != width * 4 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return torch.relu(out + (x if self.skip is None else self.skip(x)))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        self.body = nn.Sequential(*layers, _conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  _conv_bn(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return x + out if self.residual else out


def _resnet50() -> nn.Module:
    """ResNet-50 as torchvision lays it out (3-4-6-3 bottlenecks, 1000 classes; ReLU6 where it has
    ReLU, the same cost)."""
    blocks: list[nn.Module] = [_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(count):
            blocks.append(_Bottleneck(cin, width, stride if index == 0 else 1))
            cin = width * 4
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


def _mobilenet_v2() -> nn.Module:
    """MobileNetV2 1.0 as torchvision lays it out (its inverted-residual table, 1000 classes)."""
    blocks: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
    cin = 32
    for expand, cout, count, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for index in range(count):
            blocks.append(_InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
            cin = cout
    return nn.Sequential(*blocks, _conv_bn(cin, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(1280, 1000))


def _image_model(make: Callable[[], nn.Module]) -> tuple[nn.Module, ModelInput]:
    torch.manual_seed(0)
    return make().eval(), torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _llama() -> tuple[nn.Module, ModelInput]:
    model = tiny_llama(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=16000)
    return model, token_ids(1, 128, vocab=16000)


# name -> (label, build, training batch size)
MODELS: dict[str, tuple[str, Callable[[], tuple[nn.Module, ModelInput]], int]] = {
    "resnet50": ("ResNet-50 @224", lambda: _image_model(_resnet50), 16),
    "mobilenetv2": ("MobileNetV2 @224", lambda: _image_model(_mobilenet_v2), 16),
    "bert-base": ("BERT-base-like @seq 128", _bert_base, 8),
    "vit-s16": ("ViT-S/16-like @224", _vit_small, 16),
    "llama-100m": ("Llama-style decoder ~100M @seq 128", _llama, 4),
}


def _batches(model: nn.Module, example: ModelInput, size: int, count: int) -> list[Batch]:
    """Random inputs shaped like ``example`` at ``size`` rows, with labels of the model's output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        output = primary(run(model, example)).shape  # [1, classes, ...]: one label per position
    out = []
    for _ in range(count):
        parts = []
        for tensor in tensors(example):
            shape = (size, *tensor.shape[1:])
            if tensor.dtype == torch.long:
                high = int(tensor.max()) + 1 if int(tensor.max()) > 1 else 2
                parts.append(torch.randint(0, high, shape, generator=generator))
            else:
                parts.append(torch.randn(shape, generator=generator))
        inputs = rebuild(example, parts)
        out.append((inputs, torch.randint(0, output[1], (size, *output[2:]), generator=generator)))
    return out


def _to(batch: Batch, device: torch.device) -> Batch:
    inputs, targets = batch
    return rebuild(inputs, [t.to(device) for t in tensors(inputs)]), targets.to(device)


class _StepClock:
    """Yields batches to ``fine_tune`` and records when each step asked for one."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.stamps = batches, []  # type: ignore[var-annotated]

    def __iter__(self) -> Iterator[Batch]:
        index = 0
        while True:
            self.stamps.append(time.perf_counter())
            yield self.batches[index % len(self.batches)]
            index += 1


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure_model(key: str, *, threads: int, device: torch.device, steps: int, val_batches: int,
                  state: dict[str, Any]) -> dict[str, Any]:
    """One pass of every stage at ``threads``; ``state`` carries what later passes reuse."""
    label, build, size = MODELS[key]
    if "model" not in state:
        model, example = build()
        cpu, fp16 = load_profile("cpu-ort-fp32"), load_profile("ampere-trt-fp16")
        state["space_s"], space = _timed(lambda: build_space(model, example, [cpu, fp16]))
        plan = space.uniform_plan(0.5)
        state["trace_s"], _ = _timed(lambda: apply(model, example, space, space.dense_plan()))
        state.update(model=model, example=example, space=space, plan=plan, profile=cpu,
                     params=sum(p.numel() for p in model.parameters()))
    model, example, space, plan = state["model"], state["example"], state["space"], state["plan"]
    torch.set_num_threads(threads)
    apply_s, pruned = _timed(lambda: apply(model, example, space, plan))
    bundle = ModelBundle(name=key, model=model, example_input=example, train_loader=[], val_loader=[],
                         error_fn=classification_error)
    train = [_to(b, device) for b in _batches(model, example, size, max(steps, 2))]
    work = pruned.model.to(device)
    bn_s = None
    if has_batchnorm(work):
        bn_s, _ = _timed(lambda: adapt_batchnorm(work, iter(train), count=RecoverySettings().bn_batches))
    clock = _StepClock(train)
    config = RecoverySettings(steps=steps, threads=threads)
    on = ModelDevice(str(device), str(device))  # the chain's device type, for batches and masks
    finished = _timed(lambda: fine_tune(work, bundle, iter(clock), config, masks=pruned.masks, device=on))[0]
    stamps = [*clock.stamps, clock.stamps[0] + finished]
    step_s = [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)][:steps]
    val = train[:val_batches]
    score_s, _ = _timed(lambda: classification_error(work, val))
    work = work.to("cpu")
    profile = state["profile"]
    with tempfile.TemporaryDirectory() as tmp:
        if "base_bytes" not in state:
            state["base_bytes"] = export_onnx(model, example, Path(tmp) / "base", dynamic_check=True).path.read_bytes()
        base = Path(tmp) / "base.onnx"
        base.write_bytes(state["base_bytes"])
        export_s, artifact = _timed(lambda: export_onnx(work, example, Path(tmp) / "trial",
                                                        batch_size=profile.batch_size))
        with registry.get(profile.backend)(profile) as backend:
            measure_s, paired = _timed(lambda: backend.measure_paired(artifact.path, base))
    median_step = statistics.median(step_s)
    fixed = apply_s + (bn_s or 0.0) + score_s + export_s + measure_s
    return {
        "model": key, "label": label, "device": _device_name(device), "threads": threads,
        "params_m": state["params"] / 1e6, "batch": size, "space_s": state["space_s"],
        "trace_s": state["trace_s"], "apply_s": apply_s, "bn_s": bn_s, "step_s": step_s,
        "score_s": score_s, "val_batches": val_batches, "export_s": export_s, "measure_s": measure_s,
        "ratio": paired.ratio, "trial_s": fixed + DEFAULT_STEPS * median_step,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_name()})"


def _row(r: dict[str, Any]) -> str:
    steps = r["step_s"]
    bn = "-" if r["bn_s"] is None else f"{r['bn_s']:.2f}"
    step_cell = f"{statistics.median(steps):.2f} [{min(steps):.2f}-{max(steps):.2f}] x{len(steps)}"
    return (f"| {r['label']} | {r['params_m']:.1f} | {r['device']} | {r['threads']} | {r['batch']} | "
            f"{r['trace_s']:.2f} | {r['apply_s']:.2f} | {bn} | {step_cell} | {r['score_s']:.2f} "
            f"(x{r['val_batches']}) | {r['export_s']:.2f} | {r['measure_s']:.2f} | {r['trial_s']:.0f} | "
            f"{r['date']} |")


def write_docs(results: list[dict[str, Any]]) -> None:
    order = list(MODELS)
    results = sorted(results, key=lambda r: (order.index(r["model"]), r["device"], r["threads"]))
    body = (
        "Seconds per stage of one trial (a uniform plan at keep-ratio 0.5), on CPU: no GPU was "
        "available, so no GPU figure is given. The machine's 2 cores were shared with other "
        "agents' work while these ran (each run held the shared benchmark lock, but other work "
        "did not always take it), so figures carry that load. Fine-tuning steps: median [min-max] "
        "over the steps run (a few, to keep each run under 10 minutes; the first carries AdamW's "
        "state allocation). Score: classification error on the given number of batches of the "
        "training batch size. Trial s: apply + BN + score + export + measure + 30 x the median "
        "step (the default recovery: 30 AdamW steps); it leaves out the once-per-space columns "
        "and the per-batch score of a larger validation set.\n\n"
        "| model | params M | device | threads | batch | trace s (once) | apply s | BN s | "
        "fine-tune step s | score s | export s | measure s | trial s | measured |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(_row(r) for r in results) + "\n\nMachine: " + results[-1]["machine"] + ".\n"
    )
    write_section("trial-cost", "Where a trial's time goes, at real sizes (bench/trial_cost.py)",
                  "flock /work/heavy.lock .venv/bin/python bench/trial_cost.py --model NAME "
                  "(one run per model)", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (model work only)")
    parser.add_argument("--steps", type=int, default=3, help="fine-tuning steps timed")
    parser.add_argument("--val-batches", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA device here; run with --device cpu", file=sys.stderr)
        raise SystemExit(2)
    if device.type not in ("cpu", "cuda"):
        print(f"error: --device {args.device}: use cpu or cuda[:N]", file=sys.stderr)
        raise SystemExit(2)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
    warnings.filterwarnings("ignore", message=".*aten::index operator.*")
    print(f"model work on {_device_name(device)}; {args.steps} fine-tuning steps and {args.val_batches} "
          "validation batches per pass (fewer than a search's, to keep the run short)", flush=True)
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    state: dict[str, Any] = {}
    for threads in args.threads:
        result = measure_model(args.model, threads=threads, device=device, steps=args.steps,
                               val_batches=args.val_batches, state=state)
        print(_row(result), flush=True)
        stored = [r for r in stored if (r["model"], r["device"], r["threads"]) !=
                  (result["model"], result["device"], result["threads"])] + [result]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(stored, indent=1) + "\n")
    write_docs(stored)


if __name__ == "__main__":
    main()
