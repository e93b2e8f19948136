"""Search quality: hwprune's samplers against uniform pruning, random search and NetAdapt, at the
same trial budget and the same per-trial recovery.

Every method runs through the same pipeline (plan -> prune -> recover -> error -> ONNX -> paired
latency on cpu-ort-fp32 -> reward) in one SQLite database, so an architecture measured once is
shared by all methods and seeds (the latency cache). Methods:

* ``uniform``: every keep-ratio of the grid applied to all groups (a sweep: fewer trials);
* ``random``, ``tpe``, ``amc``: the scalar reward; ``nsga2``: (error, latency) as two objectives;
* ``tpe-sens``: ``tpe`` started from the sensitivity scan (``--sensitivity-start``);
* ``netadapt``: NetAdapt's greedy walk (``--sampler netadapt``) on the same scan.

The scans (one per search of ``tpe-sens``/``netadapt``: each group alone at each option, no
recovery) are not trials; their time is reported in the method's wall time.

Reported per method, as median and range over seeds:

* **latency vs uniform at equal accuracy**: for each pruned rung of the uniform sweep, the fastest
  model of the method whose accuracy is within 0.5 point of that rung's (or better), over the
  fastest uniform model meeting the same bar; the geometric mean over rungs (below 1: faster than
  uniform pruning at equal accuracy). *@best* is the same at the single bar of the best uniform
  model (the dense one included), as in earlier versions of this benchmark;
* **HV share**: the hypervolume of the method's (error, latency / base) front over the hypervolume
  of the oracle front (every trial of every method and seed pooled, plus one random search of
  ``--oracle-random`` times the budget), to the reference point (dense error + 0.10, 1.05).

A seed varies everything random in a search: the sampler, the recovery's held-out slice, batch
order and torch's generator. Two seeds are two independent searches.

Run by hand: ``.venv/bin/python bench/search_quality.py --example digits-distorted --trials 16
--seeds 0 1 2 3 4``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optuna  # noqa: E402
from _report import write_section  # noqa: E402

from search.config import cache_dir, load_search_config  # noqa: E402
from search.study.controller import prepare, run_worker  # noqa: E402
from search.study.pareto import TrialPoint, pareto_front  # noqa: E402
from search.study.read import trial_points  # noqa: E402
from search.study.runtime import Runtime, load_study  # noqa: E402
from search.study.sensitivity import to_params, uniform_indices  # noqa: E402

TARGET = "cpu-ort-fp32"
BAR = 0.005  # half a point of accuracy


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both coordinates minimised) inside ``reference``."""
    inside = sorted((e, lat) for e, lat in points if e < reference[0] and lat < reference[1])
    area, best_latency = 0.0, reference[1]
    for index, (error, latency) in enumerate(inside):
        if latency >= best_latency:
            continue
        next_error = reference[0]
        for later_error, later_latency in inside[index + 1:]:
            if later_latency < latency:
                next_error = later_error
                break
        area += (next_error - error) * (reference[1] - latency)
        best_latency = latency
    return area


# method -> (sampler, objective, sensitivity start). "uniform" runs the grid as enqueued trials.
METHODS = {
    "uniform": ("random", "reward", False),
    "random": ("random", "reward", False),
    "tpe": ("tpe", "reward", False),
    "tpe-sens": ("tpe", "reward", True),
    "amc": ("amc", "reward", False),
    "nsga2": ("nsga2", "pareto", False),
    "netadapt": ("netadapt", "reward", False),
}


def run_method(method: str, seed: int, trials: int, runtime: Runtime, source: dict[str, str],
               recovery_steps: int | None, name: str | None = None) -> list[TrialPoint]:
    sampler, objective, start = METHODS[method]
    config = load_search_config(None, {
        "name": name or f"{method}-s{seed}", **source, "targets": [TARGET],
        "sampler": sampler, "objective": objective, "trials": trials, "seed": seed,
        "recovery": {"steps": recovery_steps}, "sensitivity_start": start,
    })
    prepared = prepare(config, runtime)
    if method == "uniform":
        study = load_study(prepared.record, runtime)
        grid = sorted(set(config.keep_ratios))[:-1]  # 1.0 is the dense trial 0
        for ratio in grid:
            study.enqueue_trial(to_params(prepared.space, uniform_indices(prepared.space, ratio)))
        config = config.model_copy(update={"trials": len(grid) + 1})
        prepared.config = config
    run_worker(config.name, runtime, prepared=prepared)
    return trial_points(load_study(prepared.record, runtime))


def _relative(points: list[TrialPoint]) -> dict[int, float]:
    # Each search measured its own base model; compare latencies as ratios to that base (the
    # paired, steady figure), not as absolute microseconds.
    base = next(p for p in points if p.trial == 0).latency_us[TARGET]
    return {p.trial: p.latency_us[TARGET] / base for p in points}


def _fastest(points: list[TrialPoint], bar: float) -> float | None:
    ratios = _relative(points)
    meeting = [ratios[p.trial] for p in points if p.accuracy >= bar - 1e-12]
    return min(meeting) if meeting else None


def versus_uniform(points: list[TrialPoint], uniform: list[TrialPoint]) -> tuple[float, float]:
    """(geometric mean over the uniform rungs, at the best uniform model's bar)."""
    logs = []
    for rung in uniform:
        if rung.trial == 0:
            continue
        mine, theirs = _fastest(points, rung.accuracy - BAR), _fastest(uniform, rung.accuracy - BAR)
        if theirs is not None:
            logs.append(math.log((mine if mine is not None else 1.0) / theirs))
    top = max(p.accuracy for p in uniform) - BAR
    mine, theirs = _fastest(points, top), _fastest(uniform, top)
    return math.exp(statistics.mean(logs)), (mine or 1.0) / (theirs or 1.0)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--example", default=None, help="A built-in example (default digits-distorted).")
    source.add_argument("--model", default=None,
                        help="A model plugin MODULE:FUNCTION, e.g. zoo_plugin:resnet18_224 (bench/ is importable).")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--recovery-steps", type=int, default=None, help="Default: the search default.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--oracle-random", type=int, default=10,
                        help="The oracle also pools one random search of this many times --trials (0: none).")
    parser.add_argument("--until", default=None,
                        help="HH:MM UTC: start no new seed after this time (whole seeds only).")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = {"model": args.model} if args.model else {"example": args.example or "digits-distorted"}
    label = args.model or spec["example"]
    per_seed: dict[int, dict[str, list[TrialPoint]]] = {}
    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runtime = Runtime(db_url=f"sqlite:///{tmp}/quality.db", cache_dir=cache_dir())
        for seed in args.seeds:
            if args.until is not None and dt.datetime.now(dt.timezone.utc).strftime("%H:%M") >= args.until:
                print(f"deadline: seed {seed} and later not run", flush=True)
                break
            started = time.perf_counter()
            results = per_seed.setdefault(seed, {})
            for method in ["uniform", *(m for m in args.methods if m != "uniform")]:
                began = time.perf_counter()
                results[method] = run_method(method, seed, args.trials, runtime, spec, args.recovery_steps)
                walls.setdefault(method, []).append(time.perf_counter() - began)
                print(f"seed {seed} {method}: {len(results[method])} trials, {walls[method][-1]:.0f} s", flush=True)
            print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
        oracle_points: list[TrialPoint] = []
        oracle_trials = args.oracle_random * args.trials
        if oracle_trials and per_seed:
            began = time.perf_counter()
            oracle_points = run_method("random", 10_000, oracle_trials, runtime, spec, args.recovery_steps,
                                       name="oracle-random")
            print(f"oracle random: {len(oracle_points)} trials, {time.perf_counter() - began:.0f} s", flush=True)
    # The oracle front: every trial of every method and seed, plus the long random search. Each
    # search is read as latency ratios to its own base measurement.
    pooled = [(p.error, _relative(points)[p.trial])
              for results in per_seed.values() for points in results.values() for p in points]
    if oracle_points:
        pooled += [(p.error, _relative(oracle_points)[p.trial]) for p in oracle_points]
    dense_error = min(p.error for results in per_seed.values() for p in results["uniform"] if p.trial == 0)
    reference = (dense_error + 0.10, 1.05)
    oracle = hypervolume(pooled, reference)
    rows = []
    summary: dict[str, list[tuple[float, float, float]]] = {}
    for seed, results in per_seed.items():
        uniform = results["uniform"]
        for method, points in results.items():
            curve, at_best = versus_uniform(points, uniform)
            ratios = _relative(points)
            front = pareto_front(points, TARGET)
            volume = hypervolume([(p.error, ratios[p.trial]) for p in front], reference)
            share = volume / oracle if oracle > 0 else float("nan")
            summary.setdefault(method, []).append((curve, at_best, share))
            best = max(p.accuracy for p in points)
            wall = walls[method][list(per_seed).index(seed)]
            rows.append(f"| {seed} | {method} | {len(points)} | {100 * best:.2f}% | {curve:.3f} | "
                        f"{at_best:.3f} | {100 * share:.1f}% | {wall:.0f} |")
    medians = [
        f"| {m} | {_spread([c for c, _, _ in v])} | {_spread([b for _, b, _ in v])} | "
        f"{_spread([100 * s for _, _, s in v])} | {statistics.median(walls[m]):.0f} |"
        for m, v in summary.items()
    ]
    oracle_text = (f"plus one random search of {len(oracle_points)} trials (seed 10000)" if oracle_points
                   else "no extra random search")
    body = (
        f"Model `{label}`, target `{TARGET}`, {args.trials} completed trials per searched method "
        "(trial 0, the dense model, included; the uniform sweep: the grid's ratios below 1 plus dense), "
        f"recovery {'default (30 steps)' if args.recovery_steps is None else f'{args.recovery_steps} steps'} "
        f"per trial, seeds {list(per_seed)}. *vs uniform*: latency of the fastest model within 0.5 point "
        "of each uniform rung's accuracy over the fastest uniform model at that bar, geometric mean over "
        "the rungs (*@best*: at the best uniform model's bar only). *HV share*: hypervolume of the "
        "method's (error, latency/base) front over that of the oracle front: every trial of every method "
        f"and seed pooled, {oracle_text}; reference (dense error + 0.10, 1.05). Median (min-max) over "
        "seeds.\n\n"
        "| method | vs uniform | vs uniform @best | HV share % | wall s |\n|---|---|---|---|---|\n"
        + "\n".join(medians) + "\n\nPer seed:\n\n"
        "| seed | method | trials | best accuracy | vs uniform | @best | HV share | wall s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(body, flush=True)
    command = " ".join([".venv/bin/python bench/search_quality.py",
                        f"--model {args.model}" if args.model else f"--example {spec['example']}",
                        f"--trials {args.trials}", "--seeds", *map(str, args.seeds),
                        "--methods", *args.methods, f"--oracle-random {args.oracle_random}"]
                       + ([f"--recovery-steps {args.recovery_steps}"] if args.recovery_steps is not None else [])
                       + ([f"--until {args.until}"] if args.until is not None else []))
    key = label.replace(":", "-").replace("_", "-")
    write_section(f"search-quality-{key}", f"Search quality on {label} (bench/search_quality.py)", command, body)


if __name__ == "__main__":
    main()
