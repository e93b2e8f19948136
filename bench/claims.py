"""Stress of the trial claim, repeated: how often does an enqueued trial run twice?

Each round prepares a fresh study with 40 enqueued plans and starts 4 worker processes that run
until every plan completed (at most 60 s; heartbeat 1 s, grace 3 s); in every round worker 0 is
SIGKILLed inside its first trial so that a stale-trial retry is claimed too. A round fails when
any trial was started by two workers, a plan did not complete exactly once, a live worker exited
non-zero, or a trial was left RUNNING/WAITING.

Modes: ``hwprune`` (``search.storage.study_storage``: SQLite transactions take the write lock at
BEGIN) and ``plain`` (Optuna's RDBStorage as hwprune opened it before: the claim race is open).

Run by hand: ``.venv/bin/python bench/claims.py [--rounds 50] [--modes hwprune plain]
[--db postgresql+psycopg://...]`` (default: a fresh SQLite file per round).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("claim_stress", ROOT / "tests" / "search_tests" / "claim_stress.py")
assert _spec is not None and _spec.loader is not None
stress = importlib.util.module_from_spec(_spec)
sys.modules["claim_stress"] = stress
_spec.loader.exec_module(stress)

PLANS, WORKERS, RUN_S = 40, 4, 60.0


def _fresh_url(base: str | None, folder: Path, index: int) -> tuple[str, str]:
    """A database URL and the study name for one round."""
    if base is None:
        return f"sqlite:///{folder / f'round{index}.db'}", "claims"
    return base, f"claims-{uuid.uuid4().hex[:8]}"  # one PostgreSQL database, a study per round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--modes", nargs="+", default=["hwprune", "plain"])
    parser.add_argument("--db", default=None, help="PostgreSQL URL (default: SQLite files)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for mode in args.modes:
        failed_rounds = duplicated = lost = worker_failures = 0
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            for index in range(args.rounds):
                url, study = _fresh_url(args.db, Path(tmp), index)
                stress.prepare(url, study, PLANS)
                outcome = stress.run_round(url, study, Path(tmp) / f"starts{index}.log", mode=mode,
                                           workers=WORKERS, run_s=RUN_S, kill_one=True, env=env)
                wrong_plans = sum(outcome.plan_completions.get(p, 0) != 1 for p in range(PLANS))
                bad = (outcome.duplicated_starts or wrong_plans or outcome.failed_workers
                       or outcome.left_running_or_waiting)
                failed_rounds += bool(bad)
                duplicated += len(outcome.duplicated_starts)
                lost += wrong_plans
                worker_failures += len(outcome.failed_workers)
                print(f"{mode} round {index}: duplicated starts {outcome.duplicated_starts}, plans not run "
                      f"exactly once {wrong_plans}, failed workers {outcome.failed_workers}", flush=True)
        rows.append((mode, args.rounds, failed_rounds, duplicated, lost, worker_failures,
                     (time.perf_counter() - started) / args.rounds))
    backend = "PostgreSQL" if args.db else "SQLite"
    body = [
        f"{WORKERS} worker processes, {PLANS} enqueued plans, workers run until every plan completed (at most "
        f"{RUN_S:g} s), heartbeat 1 s, grace 3 s; "
        f"worker 0 SIGKILLed inside its first trial every round. Backend: {backend}.",
        "",
        "| mode | rounds | failed rounds | trials started twice | plans not completed once | workers exited non-zero "
        "| s / round |",
        "|---|---|---|---|---|---|---|",
        *(f"| {m} | {r} | {f} | {d} | {lost} | {w} | {s:.1f} |" for m, r, f, d, lost, w, s in rows),
    ]
    key = "claims-postgres" if args.db else "claims-sqlite"
    write_section(key, f"Trial claims under parallel workers, {backend} (bench/claims.py)",
                  f".venv/bin/python bench/claims.py --rounds {args.rounds} --modes {' '.join(args.modes)}"
                  + (" --db postgresql+psycopg://..." if args.db else ""), "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
