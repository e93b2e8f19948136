"""Budget-aware proposals: the error reached under a latency budget at equal trials, with and without.

For each seed, two TPE searches of ``--trials`` trials on the same example under the same
``--budget`` (a latency ratio to the base model, AMC's resource-constrained mode): one tries every
proposed plan, the other (``screening.budget_band``) screens proposals the latency model predicts
wholly outside ``[budget * (1 - band), budget * (1 + band)]`` before recovering them (see
``search.study.screening``, "Budget-aware proposals"). Equal trials: both recover and measure
``--trials`` plans; screened proposals are extra and cost a pruning and one forward pass each.

Reported per seed and as mean and standard deviation over the seeds: the lowest validation error
among feasible trials (measured latency ratio within the budget, confirmed where confirmed), the
number of feasible trials, the trial that first reached that error (the screen starts judging only
after ``--min-measured`` measured trials, and both searches of a seed propose the same plans until
then), the proposals screened out, and the search's time (its trials' own durations, the screened
ones included). Each search has a database of its own, so the second of a seed reuses none of the
first one's measurements.

Run by hand (one search of digits-distorted takes a few minutes on 2 shared cores):
``.venv/bin/python bench/budget_screen.py --example digits-distorted --trials 40 --budget 0.5
--band 0.15 --seeds 0 1 2`` (writes docs/benchmarks.md). ``--keep DIR`` keeps each finished
search's figures, so a run stopped part-way continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optuna  # noqa: E402
from _report import write_section  # noqa: E402

from search.config import cache_dir, load_search_config  # noqa: E402
from search.storage.record import read_trials  # noqa: E402
from search.study.controller import prepare, run_worker  # noqa: E402
from search.study.read import trial_points  # noqa: E402
from search.study.runtime import Runtime, load_study  # noqa: E402

TARGET = "cpu-ort-fp32"


def run(example: str, *, seed: int, trials: int, budget: float, band: float | None, min_measured: int,
        runtime: Runtime) -> dict[str, float]:
    """One search; its best feasible error, feasible trials, screened proposals and seconds."""
    name = f"budget-{'band' if band else 'plain'}-s{seed}"
    config = load_search_config(None, {
        "name": name, "example": example, "targets": [TARGET], "sampler": "tpe", "trials": trials,
        "seed": seed, "constraints": {"latency_budget_ratio": budget},
        "screening": {"budget_band": band, "min_measured": min_measured},
    })
    prepared = prepare(config, runtime)
    run_worker(config.name, runtime, prepared=prepared)
    study = load_study(prepared.record, runtime)
    feasible = [p for p in trial_points(study) if p.feasible and p.trial != 0]
    records = read_trials(study)
    screened = [t for t in records if t.budget_screened]
    seconds = sum(t.seconds for t in records if t.seconds is not None)
    best = min((p.error for p in feasible), default=1.0)
    found_at = min((p.trial for p in feasible if p.error == best), default=-1)
    return {"best_error": best, "best_trial": found_at, "feasible": len(feasible), "screened": len(screened),
            "seconds": seconds}


def _mean_sd(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--example", default="digits-distorted")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--band", type=float, default=0.15)
    parser.add_argument("--min-measured", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", type=Path, default=None, help="A folder keeping each finished search's figures.")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows: dict[tuple[int, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label, band in (("every plan tried", None), (f"band {args.band}", args.band)):
                database = Path(tmp) / f"{'band' if band else 'plain'}-s{seed}.db"
                runtime = Runtime(db_url=f"sqlite:///{database}", cache_dir=cache_dir())
                kept = args.keep / f"{'band' if band else 'plain'}-s{seed}.json" if args.keep else None
                identity = {"example": args.example, "trials": args.trials, "budget": args.budget, "band": band,
                            "min_measured": args.min_measured, "seed": seed, "own_database": True}
                if kept is not None and kept.is_file() and json.loads(kept.read_text())["identity"] == identity:
                    rows[seed, label] = json.loads(kept.read_text())["figures"]
                else:
                    rows[seed, label] = run(args.example, seed=seed, trials=args.trials, budget=args.budget,
                                            band=band, min_measured=args.min_measured, runtime=runtime)
                    if kept is not None:
                        kept.parent.mkdir(parents=True, exist_ok=True)
                        kept.write_text(json.dumps({"identity": identity, "figures": rows[seed, label]}))
                print(f"seed {seed}, {label}: {rows[seed, label]}", flush=True)
    labels = ["every plan tried", f"band {args.band}"]
    table = ["| seed | proposals | best feasible error | found at trial | feasible trials | screened out "
             "| search s |", "|---|---|---|---|---|---|---|"]
    for (seed, label), r in sorted(rows.items(), key=lambda item: (item[0][0], labels.index(item[0][1]))):
        table.append(f"| {seed} | {label} | {r['best_error']:.4f} | {r['best_trial']:.0f} | {r['feasible']:.0f} | "
                     f"{r['screened']:.0f} | {r['seconds']:.0f} |")
    for label in labels:
        of = [rows[seed, label] for seed in args.seeds]
        table.append(f"| mean ± sd | {label} | {_mean_sd([r['best_error'] for r in of], 4)} | "
                     f"- | {_mean_sd([r['feasible'] for r in of], 1)} | {_mean_sd([r['screened'] for r in of], 1)} | "
                     f"{_mean_sd([r['seconds'] for r in of], 0)} |")
    body = (f"`{args.example}`, TPE, {args.trials} recovered trials per search, latency budget "
            f"{args.budget}x the base model on {TARGET}, the latency model judging after "
            f"{args.min_measured} measured trials; default recovery; a database per search. Error: the "
            "example's validation error (lower is better). Run under the shared benchmark lock.\n\n"
            + "\n".join(table) + "\n")
    command = (f".venv/bin/python bench/budget_screen.py --example {args.example} --trials {args.trials} "
               f"--budget {args.budget} --band {args.band} --min-measured {args.min_measured} "
               f"--seeds {' '.join(map(str, args.seeds))}")
    write_section("budget-screen", "Budget-aware proposals (bench/budget_screen.py)", command, body)
    print(body)


if __name__ == "__main__":
    main()
