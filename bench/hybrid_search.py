"""Hybrid latency against all-measured: the same search (digits example, cpu-ort-fp32, TPE, seed 0,
Pareto objective) run once with every latency measured and once with ``--latency hybrid``; the
hypervolume of each final (confirmed) error x latency-ratio front at equal trials, and how many
real measurements (paired sessions: trials timed, not cache hits, plus confirmation sessions)
each needed.

Run by hand under the heavy lock:
``flock /work/heavy.lock .venv/bin/python bench/hybrid_search.py --trials 60`` (writes docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optuna  # noqa: E402
from _report import write_section  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from search.cli.main import app  # noqa: E402
from search.storage import Repository  # noqa: E402
from search.study.pareto import pareto_front  # noqa: E402
from search.study.read import trial_points  # noqa: E402

TARGET = "cpu-ort-fp32"
REFERENCE = (1.0, 1.1)  # (error, ratio): worse than any plan worth keeping


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both minimised) up to ``REFERENCE``."""
    area, best_ratio = 0.0, REFERENCE[1]
    for error, ratio in sorted(points):
        if ratio < best_ratio and error < REFERENCE[0]:
            area += (REFERENCE[0] - error) * (best_ratio - ratio)
            best_ratio = ratio
    return area


def run(mode: str, trials: int, folder: Path) -> dict[str, float]:
    url = f"sqlite:///{folder / (mode + '.db')}"
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["search", "start", "--name", mode, "--example", "digits", "--objective",
                                      "pareto", "--recovery-steps", "0", "--trials", str(trials), "--seed", "0",
                                      "--latency", mode, "--db", url, "--json"])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    elapsed = time.perf_counter() - started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=f"hwprune:{mode}", storage=url)
    repo = Repository(url)
    record = repo.get_search(mode)
    repo.close()
    front = pareto_front(trial_points(study, record), TARGET)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    timed = sum(1 for t in complete[1:] if t.user_attrs.get("latency_source", {}).get(TARGET, "measured") == "measured"
                and not t.user_attrs["latency"][TARGET]["cached"])
    predicted = sum(1 for t in complete if t.user_attrs.get("latency_source", {}).get(TARGET) == "predicted")
    confirmations = sum(len(v["sessions"]) - (0 if k.startswith("confirm:") and _was_predicted(study, k) else 1)
                        for k, v in study.user_attrs.items() if k.startswith("confirm:"))
    return {"hv": hypervolume([(p.error, p.ratio[TARGET]) for p in front]), "timed": timed,
            "predicted": predicted, "confirm": confirmations, "front": len(front), "elapsed": elapsed,
            "trials": len(complete)}


def _was_predicted(study: optuna.Study, key: str) -> bool:
    signature = key.rpartition(":")[2]
    return any(t.user_attrs.get("signature") == signature
               and t.user_attrs.get("latency_source", {}).get(TARGET) == "predicted" for t in study.trials)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measured = run("measured", args.trials, Path(tmp))
        hybrid = run("hybrid", args.trials, Path(tmp))
    rows = []
    for name, r in (("measured", measured), ("hybrid", hybrid)):
        rows.append(f"| {name} | {r['trials']} | {r['timed']} | {r['predicted']} | {r['confirm']} | "
                    f"{r['timed'] + r['confirm']} | {r['front']} | {r['hv']:.4f} | {r['elapsed']:.0f} |")
    share = hybrid["hv"] / measured["hv"] if measured["hv"] else float("nan")
    fewer = (measured["timed"] + measured["confirm"]) / max(1, hybrid["timed"] + hybrid["confirm"])
    body = ("| latency | trials | trials timed | trials predicted | confirmation sessions | measurements | "
            "front size | hypervolume | seconds |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\nHybrid reached {100 * share:.1f}% of the all-measured search's hypervolume with "
            f"{fewer:.2f}x fewer real measurements (reference point error {REFERENCE[0]}, ratio {REFERENCE[1]}).\n")
    write_section("hybrid-search", "Hybrid latency in a search (digits, cpu-ort-fp32)",
                  f"flock /work/heavy.lock .venv/bin/python bench/hybrid_search.py --trials {args.trials}", body)
    print(body)


if __name__ == "__main__":
    main()
