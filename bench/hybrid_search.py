"""Hybrid latency against all-measured: the same search (digits example, cpu-ort-fp32, TPE, Pareto
objective, no recovery) run once with every latency measured and once with ``--latency hybrid``,
per search seed; the hypervolume of each final (confirmed) error x latency-ratio front at equal
trials, and how many real measurements each needed.

A real measurement is one paired session: a trial timed (not the base trial, not a cache hit) or a
confirmation session (the front re-measured in fresh sessions at the end; a predicted trial that
surfaces onto the front gets all its sessions there, a measured one all but its first). Both totals
are reported, without and with confirmation: confirmation is done in both modes, so it bounds the
ratio with confirmation from above by (trials timed + confirmation) / confirmation.

Run by hand under the heavy lock (writes docs/benchmarks.md):
``flock /work/heavy.lock .venv/bin/python bench/hybrid_search.py --trials 60 --seeds 1,2,3``
``--no-write --config FILE`` runs hybrid with other screening settings without touching the page
(for choosing thresholds on seeds that are then not reported).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

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


def run(mode: str, trials: int, seed: int, folder: Path, config: Path | None) -> dict[str, Any]:
    name = f"{mode}-{seed}"
    url = f"sqlite:///{folder / (name + '.db')}"
    args = ["search", "start", "--name", name, "--example", "digits", "--objective", "pareto",
            "--recovery-steps", "0", "--trials", str(trials), "--seed", str(seed), "--latency", mode,
            "--db", url, "--json"]
    if config is not None and mode != "measured":
        args += ["--config", str(config)]
    started = time.perf_counter()
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(result.output)
    elapsed = time.perf_counter() - started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=f"hwprune:{name}", storage=url)
    repo = Repository(url)
    record = repo.get_search(name)
    repo.close()
    points = trial_points(study, record)
    front = pareto_front(points, TARGET)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    source = {t.number: t.user_attrs.get("latency_source", {}).get(TARGET, "measured") for t in complete}
    timed = sum(1 for t in complete[1:] if source[t.number] == "measured"
                and not t.user_attrs["latency"][TARGET]["cached"])
    predicted_signatures = {t.user_attrs.get("signature") for t in complete if source[t.number] == "predicted"}
    measured_signatures = {t.user_attrs.get("signature") for t in complete if source[t.number] == "measured"}
    confirm = 0
    for key, verdict in study.user_attrs.items():
        if key.startswith(f"confirm:{TARGET}:"):
            signature = key.rpartition(":")[2]
            # The controller confirms the front's trial; a measured first session counts there only
            # when that architecture was measured at trial time.
            first_measured = signature in measured_signatures or signature not in predicted_signatures
            confirm += len(verdict["sessions"]) - (1 if first_measured else 0)
    reasons = Counter(t.user_attrs.get("latency_reason", {}).get(TARGET, "measured") for t in complete)
    on_front_predicted = sum(1 for p in front if p.predicted.get(TARGET))
    return {"hv": hypervolume([(p.error, p.ratio[TARGET]) for p in front]), "timed": timed,
            "predicted": sum(1 for s in source.values() if s == "predicted"), "confirm": confirm,
            "front": len(front), "front_predicted": on_front_predicted,
            "unconfirmed": sum(1 for p in front if not p.confirmed.get(TARGET)),
            "elapsed": elapsed, "trials": len(complete), "reasons": dict(reasons)}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", default="1,2,3", help="search seeds, comma-separated")
    parser.add_argument("--config", type=Path, help="a search YAML for the hybrid runs (screening settings)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, summary = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            measured = run("measured", args.trials, seed, Path(tmp), None)
            hybrid = run("hybrid", args.trials, seed, Path(tmp), args.config)
            for name, r in (("measured", measured), ("hybrid", hybrid)):
                reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items(), key=lambda kv: -kv[1]))
                rows.append(f"| {seed} | {name} | {r['trials']} | {r['timed']} | {r['predicted']} | {r['confirm']} | "
                            f"{r['timed']} | {r['timed'] + r['confirm']} | {r['front']} ({r['front_predicted']} "
                            f"predicted at trial time) | {r['hv']:.4f} | {r['elapsed']:.0f} | "
                            f"{reasons if name == 'hybrid' else ''} |")
            entry = {"seed": seed, "share": _ratio(hybrid["hv"], measured["hv"]),
                     "fewer_excl": _ratio(measured["timed"], hybrid["timed"]),
                     "fewer_incl": _ratio(measured["timed"] + measured["confirm"], hybrid["timed"] + hybrid["confirm"]),
                     "timed": hybrid["timed"], "predicted": hybrid["predicted"], "confirm": hybrid["confirm"],
                     "unconfirmed": hybrid["unconfirmed"]}
            summary.append(entry)
            print(rows[-2], rows[-1], entry, sep="\n", flush=True)
    med = {k: statistics.median(e[k] for e in summary)
           for k in ("share", "fewer_excl", "fewer_incl", "timed", "predicted", "confirm")}
    per_seed = "\n".join(f"| {e['seed']} | {100 * e['share']:.1f}% | {e['fewer_excl']:.2f}x | {e['fewer_incl']:.2f}x |"
                         for e in summary)
    body = ("| seed | latency | trials | trials timed | trials predicted | confirmation sessions | measurements "
            "without confirmation | measurements with confirmation | front size | hypervolume | seconds | "
            "hybrid: deciding rule (trials) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\n| seed | hybrid hypervolume share | fewer measurements without confirmation | with confirmation |"
            "\n|---|---|---|---|\n" + per_seed
            + f"\n| median | {100 * med['share']:.1f}% | {med['fewer_excl']:.2f}x | {med['fewer_incl']:.2f}x |\n\n"
            f"Hybrid (median over seeds {args.seeds}): {med['timed']:.0f} trials timed, {med['predicted']:.0f} "
            f"predicted, {med['confirm']:.0f} confirmation sessions; {100 * med['share']:.1f}% of the all-measured "
            f"hypervolume (reference point error {REFERENCE[0]}, ratio {REFERENCE[1]}).\n")
    print(body)
    if not args.no_write:
        command = (f"flock /work/heavy.lock .venv/bin/python bench/hybrid_search.py --trials {args.trials} "
                   f"--seeds {args.seeds}" + (f" --config {args.config}" if args.config else ""))
        write_section("hybrid-search", "Hybrid latency in a search (digits, cpu-ort-fp32)", command, body)


if __name__ == "__main__":
    main()
