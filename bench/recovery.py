"""How well does a cheap search-time error predict the error after a long recovery, and at what cost?

For each model, random plans (a random keep-ratio from the grid for every group) are pruned and
scored on the validation data five ways: raw (no recovery), adaptive batch-norm on 2 and on the
default number of training batches, the default recovery with a short fine-tuning (adaptive BN,
fine-tuning, adaptive BN again, keep the better on the held-out training slice), and the
reference: the same with a long fine-tuning.
Reported: the Spearman rank correlation of each cheap error with the reference error over the
plans, and the median seconds each costs per plan.

A second table compares fine-tuning candidates on nearly dense plans (every group keeps >= 0.75),
without keeping the better, so the optimiser alone shows whether it makes a model worse than
adaptive BN left it: SGD lr 0.01 (the old default), SGD with the learning rate from a short range
test, AdamW with warm-up at two learning rates, and AdamW with distillation to the dense outputs.

Models: the built-in ``digits`` example, and the zoo's ResNet-18 (width 16) and MobileNetV2
trained here on the same digits images upsampled to ``--resolution`` with 3 channels (the zoo
builds architectures without weights; the project downloads none). A third table times adaptive
BN and fine-tuning steps at 224x224 on the zoo's ResNet-18 at full width (64), untrained (cost
does not depend on the weights).

Run by hand (about 15-20 minutes on 2 shared cores):
``.venv/bin/python bench/recovery.py [--plans 30] [--resolution 32]`` (writes docs/benchmarks.md).

``--example efficientnet-lite0@96`` asks the same question on a *pretrained* network (the
built-in EfficientNet-Lite0 example, error = 1 - top-1 agreement with the dense model): each
random plan (every group keeps a random ratio >= ``--low``) is scored raw, after adaptive BN
alone, after adaptive BN + k distillation steps for each ``--short`` k, and after the reference
recovery of ``--long`` steps; rho and the cost of each score are reported, with a bootstrap
interval over the plans. ``--reference-seeds 2`` also repeats the reference with recovery seed 1:
its rho against the seed-0 reference is the ceiling any search-time score can reach, since the
reference itself is one draw of the fine-tuning. Each plan's result is kept in ``--keep`` (a JSON-lines file) as soon as
it is measured, and ``--max-minutes`` stops before the next plan: the same command continues.

``--example ... --generalisation STEPS:LR ...`` asks whether recovery carries from the training
photographs to the validation ones: the uniform rung at keep ``--low`` (the proof's ladder,
``uniform_indices``) is recovered with the pretrained recipe for each number of steps and learning
rate, and its error is reported on the held-out training batches (crops of the training photographs
it did not train on), on every training crop, and on the validation crops (other photographs).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _report import write_section  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from search.config import PRETRAINED_RECOVERY, RecoverySettings, cache_dir  # noqa: E402
from search.examples.digits import digits, digits_tensors  # noqa: E402
from search.examples.zoo import make_architecture  # noqa: E402
from search.pipeline.bundle import ModelBundle, classification_error  # noqa: E402
from search.pipeline.plan import Plan  # noqa: E402
from search.pipeline.recovery import (  # noqa: E402
    adapt_batchnorm,
    recover,
    recover_with_report,
    training_split,
)
from search.pipeline.space import SearchSpace, apply, build_space  # noqa: E402
from search.study.sensitivity import uniform_indices  # noqa: E402

THREADS = 1


def default_recovery(steps: int) -> RecoverySettings:
    return RecoverySettings(steps=steps, threads=THREADS)  # recovered with seed 0


def replace(config: RecoverySettings, **changes: Any) -> RecoverySettings:
    return config.model_copy(update=changes)


def zoo_bundle(name: str, resolution: int, *, epochs: int, batch: int) -> ModelBundle:
    """A zoo architecture trained on digits at ``resolution`` (cached after the first run)."""
    x_train, y_train, x_val, y_val = digits_tensors(resolution)
    x_train, x_val = x_train.expand(-1, 3, -1, -1).contiguous(), x_val.expand(-1, 3, -1, -1).contiguous()
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    model, _ = make_architecture(name, resolution=resolution)
    path = cache_dir() / "bench" / f"{name}-digits{resolution}-e{epochs}-b{batch}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        started = time.perf_counter()
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                       total_steps=epochs * len(train_loader))
        model.train()
        for _ in range(epochs):
            for inputs, targets in train_loader:
                optimizer.zero_grad()
                F.cross_entropy(model(inputs), targets).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        print(f"trained {name} at {resolution} in {time.perf_counter() - started:.0f} s", flush=True)
    model.eval()
    return ModelBundle(name=f"{name}@{resolution}", model=model, example_input=x_val[:1].clone(),
                       train_loader=train_loader,
                       val_loader=DataLoader(TensorDataset(x_val, y_val), batch_size=256),
                       error_fn=classification_error)


def random_plan(space: SearchSpace, rng: random.Random, low: float = 0.0) -> Plan:
    return Plan(channels={g.name: rng.choice([r for r in g.ratios if r >= low] or [1.0])
                          for g in space.groups})


def timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def timed_recovery(model: nn.Module, bundle: ModelBundle, config: RecoverySettings,
                   masks: Mapping[str, torch.Tensor] | None = None) -> float:
    return timed(lambda: recover(model, bundle, config, masks=masks))


def timed_adaptation(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> float:
    return timed(lambda: adapt_batchnorm(model, iter(data), count=count))


def rank_table(bundle: ModelBundle, space: SearchSpace, *, plans: int, short: list[int], long: int,
               seed: int) -> tuple[list[str], dict[str, float]]:
    rng = random.Random(seed)
    bn = RecoverySettings().bn_batches
    columns = ["raw", "BN-2", "BN-8", *(f"BN-{bn} + {s} steps" for s in short), f"BN-{bn} + {long} steps"]
    errors: dict[str, list[float]] = {c: [] for c in columns}
    costs: dict[str, list[float]] = {c: [] for c in columns}
    split = training_split(bundle.train_loader, holdout_batches=2, seed=0)

    def error(model: nn.Module) -> float:
        return bundle.error_fn(model, bundle.val_loader)

    torch.set_num_threads(THREADS)
    for index in range(plans):
        plan = random_plan(space, rng)
        pruned = apply(bundle.model, bundle.example_input, space, plan)
        for column in columns:
            model = copy.deepcopy(pruned.model)
            started = time.perf_counter()
            if column.startswith("BN-") and "steps" not in column:
                adapt_batchnorm(model, split.batches(), count=int(column[3:]))
            elif column != "raw":
                steps = int(column.split("+ ")[1].split()[0])
                recover(model, bundle, default_recovery(steps), masks=pruned.masks)
            errors[column].append(error(model))
            costs[column].append(time.perf_counter() - started)
        print(f"  plan {index}: " + ", ".join(f"{c} {errors[c][-1]:.3f}" for c in columns), flush=True)
    reference = errors[columns[-1]]
    rows, rhos = [], {}
    for column in columns:
        rho = float(spearmanr(errors[column], reference).statistic) if column != columns[-1] else 1.0
        rhos[column] = rho
        rows.append(f"| {bundle.name} | {column} | {rho:.3f} | {statistics.mean(errors[column]):.3f} | "
                    f"{statistics.median(costs[column]):.2f} |")
    return rows, rhos


def lr_range_test(bundle: ModelBundle, model: nn.Module, *, steps: int = 20) -> float:
    """Leslie Smith's range test: lr grows 1e-5 -> 1 over ``steps``; a tenth of the lr at the
    lowest smoothed loss."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    batches = training_split(bundle.train_loader, holdout_batches=2, seed=0).batches()
    best_lr, best_loss, smooth = 1e-5, float("inf"), None
    for step in range(steps):
        lr = 1e-5 * (1e5 ** (step / (steps - 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = next(batches)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        value = float(loss.detach())
        smooth = value if smooth is None else 0.7 * smooth + 0.3 * value
        if smooth < best_loss:
            best_lr, best_loss = lr, smooth
        if smooth > 4 * best_loss or not torch.isfinite(loss):
            break
    return best_lr / 10


def optimizer_table(bundle: ModelBundle, space: SearchSpace, *, plans: int, steps: int,
                    seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    chosen = [space.uniform_plan(0.875), space.uniform_plan(0.75)]
    chosen += [random_plan(space, rng, low=0.75) for _ in range(plans - len(chosen))]
    base = default_recovery(steps)
    range_lr = lr_range_test(bundle, apply(bundle.model, bundle.example_input, space, chosen[0]).model)
    candidates = {
        "SGD lr 0.01, momentum 0.9 (old default)": replace(base, optimizer="sgd", lr=0.01, warmup=0, distill=0),
        f"SGD lr {range_lr:.2g} (range test), warm-up": replace(base, optimizer="sgd", lr=range_lr, distill=0),
        "AdamW lr 1e-3, warm-up": replace(base, optimizer="adamw", lr=1e-3, distill=0),
        "AdamW lr 3e-4, warm-up": replace(base, optimizer="adamw", lr=3e-4, distill=0),
        "AdamW lr 1e-3, warm-up, distillation": replace(base, optimizer="adamw", lr=1e-3, distill=1.0),
    }
    torch.set_num_threads(THREADS)
    adapted = []
    for plan in chosen:
        pruned = apply(bundle.model, bundle.example_input, space, plan)
        recover(pruned.model, bundle, replace(base, steps=0, holdout_batches=0))
        adapted.append((pruned, bundle.error_fn(pruned.model, bundle.val_loader)))
    rows = []
    for label, config in candidates.items():
        # No keep-the-better here: the optimiser alone, against adaptive BN without fine-tuning.
        config = replace(config, holdout_batches=0)
        deltas, seconds = [], []
        for pruned, before in adapted:
            model = copy.deepcopy(pruned.model)
            seconds.append(timed_recovery(model, bundle, config, pruned.masks))
            deltas.append(bundle.error_fn(model, bundle.val_loader) - before)
        worse = sum(d > 0 for d in deltas)
        rows.append(f"| {bundle.name} | {label} | {statistics.mean(deltas):+.4f} | {max(deltas):+.4f} | "
                    f"{worse}/{len(deltas)} | {statistics.median(seconds):.2f} |")
        print(rows[-1], flush=True)
    return rows


def cost_at_224(plans: int, steps: int) -> list[str]:
    model, _ = make_architecture("resnet18-full", resolution=224)
    space = build_space(model, torch.randn(1, 3, 224, 224), [load_profile("cpu-ort-fp32")])
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 224, 224, generator=generator), torch.randint(0, 10, (32,), generator=generator))
            for _ in range(2)]
    bundle = ModelBundle(name="resnet18-full@224", model=model, example_input=data[0][0][:1],
                         train_loader=data, val_loader=data[:1], error_fn=classification_error)
    rng = random.Random(0)
    torch.set_num_threads(THREADS)
    rows = []
    for index in range(plans):
        plan = space.uniform_plan(1.0) if index == 0 else random_plan(space, rng)
        pruned = apply(model, bundle.example_input, space, plan)
        row = [f"{pruned.macs / space.base_macs:.2f}"]
        for count in (1, 2):
            row.append(f"{timed_adaptation(copy.deepcopy(pruned.model), data, count):.2f}")
        config = replace(default_recovery(steps), bn_batches=0, holdout_batches=0)
        row.append(f"{timed_recovery(copy.deepcopy(pruned.model), bundle, config) / steps:.2f}")
        rows.append("| " + " | ".join(row) + " |")
        print(rows[-1], flush=True)
    return rows


def pretrained_recovery(bundle: ModelBundle, steps: int, *, bn_batches: int, threads: int,
                        recipe: str = "search-default") -> RecoverySettings:
    """A recovery for a pretrained example: ``steps`` of fine-tuning on the bundle's loss (a
    distillation of the dense logits), keep the better on 2 held-out batches; with the search's
    defaults (``search-default``: adaptive BN on ``bn_batches``, BatchNorm trained, lr 3e-4) or
    with ``search.config.PRETRAINED_RECOVERY`` (``pretrained``: statistics frozen, no adaptive BN)."""
    settings = replace(default_recovery(steps), bn_batches=bn_batches, threads=threads)
    return replace(settings, **PRETRAINED_RECOVERY) if recipe == "pretrained" else settings


def _pruning_options(args: argparse.Namespace) -> str:
    """The --importance and --compensation flags of a command line, where not the defaults."""
    return ((f" --importance {args.importance}" if args.importance != "magnitude" else "")
            + (f" --compensation {args.compensation}" if args.compensation != "none" else ""))


def _kept_plans(path: Path, identity: dict[str, object]) -> dict[int, dict[str, object]]:
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0] != {"identity": identity}:
        sys.exit(f"{path}: kept for other settings ({lines[0] if lines else 'empty'}); move it away")
    return {int(row["plan"]): row for row in lines[1:]}


def _bootstrap_rho(xs: list[float], ys: list[float], seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    draws = []
    for _ in range(1000):
        pick = [rng.randrange(len(xs)) for _ in xs]
        a, b = [xs[i] for i in pick], [ys[i] for i in pick]
        if len(set(a)) > 1 and len(set(b)) > 1:
            draws.append(float(spearmanr(a, b).statistic))
    draws.sort()
    return draws[int(0.05 * len(draws))], draws[int(0.95 * len(draws)) - 1]


def pretrained_rank(args: argparse.Namespace) -> None:
    """The rank table on a pretrained example, resumable plan by plan (see the module docstring)."""
    from search.examples import load_bundle

    started = time.perf_counter()
    bundle = load_bundle(args.example, cache_dir=cache_dir())
    space = build_space(bundle.model, bundle.example_input, [load_profile("cpu-ort-fp32")])
    if args.recipe == "pretrained":  # no adaptive BN: the recipe's statistics stay as trained
        columns = ["raw", *(f"{k} steps" for k in args.short), f"{args.long} steps"]
    else:
        columns = ["raw", f"BN-{args.bn}", *(f"BN-{args.bn} + {k} steps" for k in args.short),
                   f"BN-{args.bn} + {args.long} steps"]
    # The reference stays last; its repeats with other recovery seeds go before it.
    repeats = [f"{columns[-1]}, seed {seed}" for seed in range(1, args.reference_seeds)]
    columns[-1:-1] = repeats
    identity: dict[str, object] = {"example": args.example, "low": args.low, "bn": args.bn, "short": args.short,
                                   "long": args.long, "threads": args.threads, "seed": 0}
    if args.recipe != "search-default":
        identity["recipe"] = args.recipe
    if args.reference_seeds > 1:
        identity["reference_seeds"] = args.reference_seeds
    for option, default in (("importance", "magnitude"), ("compensation", "none")):
        if getattr(args, option) != default:
            identity[option] = getattr(args, option)
    kept = _kept_plans(args.keep, identity)
    if not kept:
        args.keep.parent.mkdir(parents=True, exist_ok=True)
        args.keep.write_text(json.dumps({"identity": identity}) + "\n")
    rng = random.Random(0)
    for index in range(args.plans):
        plan = random_plan(space, rng, low=args.low)  # drawn even when kept: the sequence stays the same
        if index in kept:
            continue
        if time.perf_counter() - started > 60 * args.max_minutes:
            # A part of the plans writes no table: it would replace the page's section.
            print(f"stopped after {len(kept)} of {args.plans} plans: run the same command again", flush=True)
            return
        pruned = apply(bundle.model, bundle.example_input, space, plan, importance=args.importance,
                       compensation=args.compensation, calibration=bundle.train_loader)
        errors, costs = {}, {}
        for column in columns:
            model = copy.deepcopy(pruned.model)
            begun = time.perf_counter()
            if column != "raw":
                steps = int(column.split(", seed")[0].split()[-2]) if "steps" in column else 0
                seed = int(column.rsplit(" ", 1)[-1]) if ", seed" in column else 0
                recover(model, bundle, pretrained_recovery(bundle, steps, bn_batches=args.bn, threads=args.threads,
                                                           recipe=args.recipe), seed=seed, masks=pruned.masks)
            errors[column] = bundle.error_fn(model, bundle.val_loader)
            costs[column] = time.perf_counter() - begun
        row = {"plan": index, "macs_ratio": pruned.macs / space.base_macs, "errors": errors, "costs": costs}
        with args.keep.open("a") as out:
            out.write(json.dumps(row) + "\n")
        kept[index] = row
        print(f"  plan {index} ({row['macs_ratio']:.2f}x MACs): "
              + ", ".join(f"{c} {errors[c]:.3f}" for c in columns), flush=True)
    rows = [kept[i] for i in sorted(kept)]
    if len(rows) < 3:
        print(f"{len(rows)} plans kept: too few for a table", flush=True)
        return
    reference = [float(r["errors"][columns[-1]]) for r in rows]  # type: ignore[index]
    table = []
    for column in columns:
        values = [float(r["errors"][column]) for r in rows]  # type: ignore[index]
        cost = statistics.median(float(r["costs"][column]) for r in rows)  # type: ignore[index]
        if column == columns[-1]:
            rho_text = "(reference)"
        elif column in repeats:
            rho = float(spearmanr(values, reference).statistic)
            low, high = _bootstrap_rho(values, reference)
            rho_text = f"{rho:.3f} [{low:.2f}, {high:.2f}] (ceiling)"
        else:
            rho = float(spearmanr(values, reference).statistic)
            low, high = _bootstrap_rho(values, reference)
            rho_text = f"{rho:.3f} [{low:.2f}, {high:.2f}]"
        table.append(f"| {column} | {rho_text} | {statistics.mean(values):.3f} | "
                     f"{min(values):.3f}-{max(values):.3f} | {cost:.1f} |")
    macs = [float(r["macs_ratio"]) for r in rows]  # type: ignore[arg-type]
    settings = pretrained_recovery(bundle, args.long, bn_batches=args.bn, threads=args.threads, recipe=args.recipe)
    if args.recipe == "pretrained":
        recipe = (f"the pretrained examples' recipe (`search.config.PRETRAINED_RECOVERY`): no adaptive BN, "
                  f"BatchNorm statistics frozen while fine-tuning, AdamW (lr {settings.lr:g}")
    else:
        recipe = (f"the search's defaults: adaptive BN on {args.bn} training batches, BatchNorm trained with "
                  f"the weights, AdamW (lr {settings.lr:g}")
    body = (
        f"{len(rows)} of {args.plans} random plans of `{args.example}` (every group keeps a random "
        f"ratio >= {args.low} of the grid; MACs {min(macs):.2f}-{max(macs):.2f}x the dense model's; "
        f"channels chosen by {args.importance} importance, compensation {args.compensation}). "
        f"Error: {bundle.error_name} on the validation crops (not ImageNet accuracy). Recovery: "
        f"{recipe}, warm-up, cosine) distilling the dense logits, keep the better on 2 held-out batches; "
        f"{args.threads} threads. rho: Spearman rank correlation with the reference ({columns[-1]}) over "
        "the plans, with a 90% bootstrap interval over the plans"
        + ("; *ceiling*: the reference repeated with another recovery seed, the best rank agreement a "
           "search-time score can have with one draw of the reference" if repeats else "")
        + "; seconds: median per plan, "
        "including one validation pass. Run under the shared benchmark lock.\n\n"
        "| search-time score | Spearman rho [90%] | mean error | range | s per plan |\n|---|---|---|---|---|\n"
        + "\n".join(table) + "\n"
    )
    command = (f".venv/bin/python bench/recovery.py --example {args.example} --plans {args.plans} --low {args.low} "
               f"--bn {args.bn} --short {' '.join(map(str, args.short))} --long {args.long} "
               f"--threads {args.threads} --recipe {args.recipe} --keep {args.keep}"
               + (f" --reference-seeds {args.reference_seeds}" if args.reference_seeds > 1 else "")
               + _pruning_options(args))
    key = ("recovery-pretrained" + ("" if args.recipe == "search-default" else f"-{args.recipe}-recipe")
           + ("" if args.importance == "magnitude" else f"-{args.importance}")
           + ("" if args.compensation == "none" else f"-{args.compensation}-compensation"))
    write_section(key, f"Recovery on a pretrained network, {args.recipe} recipe (bench/recovery.py --example)",
                  command, body)
    print(body, flush=True)


def generalisation(args: argparse.Namespace) -> None:
    """Training, held-out and validation error of one uniform rung after each recovery (see the
    module docstring): does what recovery learns on the training photographs carry to others?"""
    from search.examples import load_bundle

    bundle = load_bundle(args.example, cache_dir=cache_dir())
    space = build_space(bundle.model, bundle.example_input, [load_profile("cpu-ort-fp32")])
    indices = uniform_indices(space, args.low)
    plan = Plan(channels={g.name: g.ratios[indices[g.name]] for g in space.groups})
    pruned = apply(bundle.model, bundle.example_input, space, plan, importance=args.importance,
                   compensation=args.compensation, calibration=bundle.train_loader)
    table = []
    for setting in args.generalisation:
        steps_text, _, lr_text = setting.partition(":")
        steps, lr = int(steps_text), float(lr_text or PRETRAINED_RECOVERY["lr"])
        settings = replace(pretrained_recovery(bundle, steps, bn_batches=0, threads=args.threads,
                                               recipe="pretrained"), lr=lr)
        begun = time.perf_counter()
        report = recover_with_report(copy.deepcopy(pruned.model), bundle, settings, seed=0, masks=pruned.masks)
        seconds = time.perf_counter() - begun
        held_out = report.holdout_error.get(report.kept)
        row = (f"| {steps} | {lr:g} | {report.kept} | {'-' if held_out is None else f'{held_out:.3f}'} | "
               f"{bundle.error_fn(report.model, bundle.train_loader):.3f} | "
               f"{bundle.error_fn(report.model, bundle.val_loader):.3f} | {seconds:.0f} |")
        print(row, flush=True)
        table.append(row)
    body = (
        f"The uniform rung at keep {args.low} of `{args.example}` ({pruned.macs / space.base_macs:.2f}x the "
        f"dense model's MACs; channels "
        f"by {args.importance} importance, compensation {args.compensation}), recovered with the pretrained "
        "recipe (`search.config.PRETRAINED_RECOVERY`: BatchNorm statistics frozen, no adaptive BN, AdamW, "
        "warm-up, cosine; distilling the dense logits; keep the better on 2 held-out training batches) for "
        f"each number of steps and learning rate, {args.threads} threads, recovery seed 0. Error: "
        f"{bundle.error_name}. *held out*: the 2 training batches recovery holds out (crops of the training "
        "photographs it did not train on), for the model it kept; *training*: every training crop; "
        "*validation*: the validation crops, cut from other photographs. 0 steps: as pruned.\n\n"
        "| steps | lr | kept | held-out error | training error | validation error | s |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(table) + "\n"
    )
    command = (f".venv/bin/python bench/recovery.py --example {args.example} --low {args.low} "
               f"--threads {args.threads} --generalisation {' '.join(args.generalisation)}"
               + _pruning_options(args))
    write_section("recovery-generalisation", "Does recovery carry to other photographs? (bench/recovery.py "
                  "--generalisation)", command, body)
    print(body, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plans", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--short", type=int, nargs="+", default=[10])
    parser.add_argument("--long", type=int, default=50)
    parser.add_argument("--zoo-long", type=int, default=40)
    parser.add_argument("--candidate-plans", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18", "mobilenetv2"])
    parser.add_argument("--example", default=None,
                        help="A pretrained built-in example (efficientnet-lite0@RES): the rank table only.")
    parser.add_argument("--low", type=float, default=0.5, help="--example: the lowest keep ratio drawn.")
    parser.add_argument("--bn", type=int, default=4, help="--example: adaptive-BN batches.")
    parser.add_argument("--threads", type=int, default=1, help="--example: torch threads for recovery.")
    parser.add_argument("--recipe", choices=["search-default", "pretrained"], default="search-default",
                        help="--example: the search's default recovery, or the pretrained examples' one.")
    parser.add_argument("--keep", type=Path, default=Path("bench/results/recovery-pretrained.jsonl"))
    parser.add_argument("--importance", default="magnitude", help="--example: channel importance of the plans.")
    parser.add_argument("--compensation", default="none", choices=["none", "mean"],
                        help="--example: put removed channels' mean output back into their consumers.")
    parser.add_argument("--reference-seeds", type=int, default=1,
                        help="--example: also repeat the reference with recovery seeds 1..N-1 (its rho: the ceiling).")
    parser.add_argument("--generalisation", nargs="+", default=None, metavar="STEPS:LR",
                        help="--example: recover the uniform rung at --low for each STEPS:LR and report "
                             "its training, held-out and validation error (no rank table).")
    parser.add_argument("--max-minutes", type=float, default=1e9,
                        help="--example: start no plan after this many minutes; run again to continue.")
    args = parser.parse_args()
    if args.example is not None and args.generalisation:
        generalisation(args)
        return
    if args.example is not None:
        pretrained_rank(args)
        return
    started = time.perf_counter()
    rank_rows, optimizer_rows, seconds = [], [], {}
    for name in args.models:
        begun = time.perf_counter()
        if name == "digits":
            bundle, long = digits(cache_dir=cache_dir()), args.long
        else:
            bundle, long = zoo_bundle(name, args.resolution, epochs=4, batch=32), args.zoo_long
        space = build_space(bundle.model, bundle.example_input, [load_profile("cpu-ort-fp32")])
        print(f"{bundle.name}: base error {bundle.error_fn(bundle.model, bundle.val_loader):.4f}", flush=True)
        optimizer_rows += optimizer_table(bundle, space, plans=args.candidate_plans, steps=min(args.short),
                                          seed=0)
        rows, _ = rank_table(bundle, space, plans=args.plans, short=args.short, long=long, seed=0)
        rank_rows += rows
        seconds[bundle.name] = time.perf_counter() - begun
        print(f"{bundle.name}: {seconds[bundle.name]:.0f} s", flush=True)
    cost_rows = cost_at_224(2, 1)
    settings = RecoverySettings()
    body = (
        f"Default recovery: {settings.optimizer} lr {settings.lr}, warm-up {settings.warmup} of the "
        f"steps then cosine decay, distillation {settings.distill}, adaptive BN on "
        f"{settings.bn_batches} training batches, {settings.holdout_batches} held-out training "
        f"batches to keep the better; {THREADS} threads. Models: the `digits` example (16x16, batch "
        f"64) and the zoo's ResNet-18 (width 16) and MobileNetV2 trained here for 4 epochs on the "
        f"digits images upsampled to {args.resolution}x{args.resolution} (batch 32). "
        f"**Not 224x224**: at 224 a training step of these models takes 3-10 s on this machine, "
        f"so {args.plans} plans with a long recovery each would take hours; the cost at 224 is "
        f"timed separately below.\n\n"
        f"### Rank correlation with the error after a long recovery\n\n"
        f"{args.plans} random plans per model (a random keep-ratio of the grid for every group). "
        f"Reference: adaptive BN + {args.long} steps (digits) or {args.zoo_long} steps (zoo models) "
        "of the default fine-tuning. rho: Spearman rank correlation over the plans of the column's "
        "validation error with the reference's. Seconds: median per plan, including the "
        "validation pass.\n\n"
        "| model | search-time error | Spearman rho | mean error | s per plan |\n|---|---|---|---|---|\n"
        + "\n".join(rank_rows) + "\n\n"
        f"### Fine-tuning candidates on nearly dense plans\n\n"
        f"{args.candidate_plans} plans per model (uniform 0.875, uniform 0.75, then random with every "
        f"group >= 0.75), adaptive BN then {min(args.short)} steps, *without* keeping the better. "
        "Change in validation error against adaptive BN alone (negative: fine-tuning helped).\n\n"
        "| model | candidate | mean change | worst change | plans made worse | s per plan |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(optimizer_rows) + "\n\n"
        "### Cost at 224x224: ResNet-18 (width 64), batches of 32\n\n"
        f"Seconds for adaptive BN on 1 and 2 batches, and per fine-tuning step (default optimiser, "
        f"1 step timed), {THREADS} thread; the first plan is dense.\n\n"
        "| MACs / base | BN 1 batch s | BN 2 batches s | s per fine-tuning step |\n"
        "|---|---|---|---|\n" + "\n".join(cost_rows) + "\n\n"
        f"Run time: {time.perf_counter() - started:.0f} s.\n"
    )
    command = (f".venv/bin/python bench/recovery.py --plans {args.plans} --resolution {args.resolution} "
               f"--short {' '.join(map(str, args.short))} --long {args.long} --zoo-long {args.zoo_long}")
    write_section("recovery", "Recovery and the cheap score (bench/recovery.py)", command, body)


if __name__ == "__main__":
    main()
