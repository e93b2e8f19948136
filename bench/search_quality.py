"""Search quality on the digits example: hwprune (tpe, amc) against random search and a
uniform-ratio sweep, at the same trial budget and the same recovery fine-tuning.

Every method runs through the same pipeline (plan -> prune -> recover -> error -> ONNX -> paired
latency on cpu-ort-fp32 -> reward) in one SQLite database, so an architecture measured once is
shared by all methods. The uniform sweep evaluates every keep-ratio of the grid applied to all
groups (same rounding to multiples of 16): fewer plans than the budget, as a sweep has.

Reported per method and seed:
  * at equal accuracy: the fastest model whose accuracy is within 0.5 point of the best uniform
    model's, and its latency over the fastest such uniform model;
  * the hypervolume of the (error, latency / base latency) front against the reference point
    (error 0.10, latency ratio 1.05): larger is better.

Methods: ``tpe``, ``amc`` and ``random`` optimise the scalar reward; ``tpe-pareto`` and
``nsga2-pareto`` optimise (error, latency) as two objectives.

A seed here is the search's ``seed``, and it varies everything random in a search: the sampler,
the recovery's held-out slice of the training data, its batch order (and so the batches adaptive
batch-norm sees) and torch's generator during recovery (see ``search.pipeline.recovery``). Two seeds are
two independent searches, not one search re-sampled.

Run by hand: ``.venv/bin/python bench/search_quality.py [--trials 24] [--seeds 0 1 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optuna  # noqa: E402
from _report import write_section  # noqa: E402

from search.config import cache_dir, load_search_config  # noqa: E402
from search.pipeline.space import kept_units  # noqa: E402
from search.study.controller import prepare, run_worker  # noqa: E402
from search.study.pareto import TrialPoint, pareto_front  # noqa: E402
from search.study.read import trial_points  # noqa: E402
from search.study.runtime import Runtime, load_study  # noqa: E402

TARGET = "cpu-ort-fp32"
REFERENCE = (0.10, 1.05)


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


# method -> (sampler, objective). "uniform" runs the grid as enqueued trials.
METHODS = {
    "uniform": ("random", "reward"),
    "random": ("random", "reward"),
    "tpe": ("tpe", "reward"),
    "amc": ("amc", "reward"),
    "tpe-pareto": ("tpe", "pareto"),
    "nsga2-pareto": ("nsga2", "pareto"),
}


def run_method(method: str, seed: int, trials: int, runtime: Runtime, recovery_steps: int) -> list[TrialPoint]:
    sampler, objective = METHODS[method]
    config = load_search_config(None, {
        "name": f"{method}-s{seed}-r{recovery_steps}", "example": "digits", "targets": [TARGET],
        "sampler": sampler, "objective": objective, "trials": trials, "seed": seed,
        "recovery": {"steps": recovery_steps}, "error_floor": 1 / 360,
    })
    prepared = prepare(config, runtime)
    if method == "uniform":
        study = load_study(prepared.record, runtime)
        grid = sorted(set(config.keep_ratios))[:-1]  # 1.0 is the dense trial 0
        for ratio in grid:
            params = {}
            for group in prepared.space.groups:
                kept = kept_units(group.size, max(ratio, min(group.ratios)), group.multiple)
                params[f"keep:{group.name}"] = group.kept.index(kept)
            study.enqueue_trial(params)
        config = config.model_copy(update={"trials": len(grid) + 1})
        prepared.config = config
    run_worker(config.name, runtime, prepared=prepared)
    return trial_points(load_study(prepared.record, runtime))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    summary: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runtime = Runtime(db_url=f"sqlite:///{tmp}/quality.db", cache_dir=cache_dir())
        for seed in args.seeds:
            started = time.perf_counter()
            methods = ["uniform", *(m for m in args.methods if m != "uniform")]
            results = {m: run_method(m, seed, args.trials, runtime, args.recovery_steps) for m in methods}
            # Each search measured its own base model; compare latencies as ratios to that base
            # (the paired, steady figure), not as absolute microseconds.
            def relative(points: list[TrialPoint]) -> dict[int, float]:
                base = next(p for p in points if p.trial == 0).latency_us[TARGET]
                return {p.trial: p.latency_us[TARGET] / base for p in points}

            uniform = results["uniform"]
            threshold = max(p.accuracy for p in uniform) - 0.005

            def fastest(points: list[TrialPoint], bar: float = threshold) -> tuple[TrialPoint, float]:
                ratios = relative(points)
                chosen = min((p for p in points if p.accuracy >= bar - 1e-12), key=lambda p: ratios[p.trial])
                return chosen, ratios[chosen.trial]

            _, uniform_ratio = fastest(uniform)
            for method, points in results.items():
                chosen, chosen_ratio = fastest(points)
                versus = chosen_ratio / uniform_ratio
                ratios = relative(points)
                front = pareto_front(points, TARGET)
                volume = hypervolume([(p.error, ratios[p.trial]) for p in front], REFERENCE)
                summary.setdefault(method, []).append((versus, volume))
                rows.append(
                    f"| {seed} | {method} | {len(points)} | {100 * chosen.accuracy:.2f}% | "
                    f"{chosen_ratio:.3f} | {versus:.3f} | {volume:.5f} |"
                )
                print(rows[-1], flush=True)
            print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    means = [
        f"| {m} | {statistics.mean(r for r, _ in v):.3f} | {statistics.mean(h for _, h in v):.5f} |"
        for m, v in summary.items()
    ]
    body = (
        f"digits example, target `{TARGET}`, {args.trials} completed trials per searched method "
        "(the uniform sweep: the 6 grid ratios below 1 plus dense), " f"{args.recovery_steps} "
        f"recovery steps per trial, seeds {args.seeds}. *Latency vs uniform*: the fastest model "
        "within 0.5 accuracy point of the best uniform model, over the fastest uniform model that "
        "meets the same bar (below 1.0 means the search found faster models at equal accuracy). "
        f"*HV*: hypervolume of the (error, latency/base) front to the reference {REFERENCE}.\n\n"
        "| seed | method | trials | accuracy | latency / base | latency vs uniform | HV |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Means over seeds:\n\n| method | latency vs uniform | HV |\n|---|---|---|\n" + "\n".join(means) + "\n\n"
        "Aim: searched <= 0.80x uniform latency at equal accuracy.\n"
    )
    command = (f".venv/bin/python bench/search_quality.py --trials {args.trials} --seeds "
               f"{' '.join(map(str, args.seeds))} --recovery-steps {args.recovery_steps}")
    write_section(f"search-quality-r{args.recovery_steps}",
                  f"Search quality, {args.recovery_steps} recovery steps (bench/search_quality.py)", command, body)


if __name__ == "__main__":
    main()
