"""Do a front's latency figures survive re-measurement? Before and after confirmation.

For each model (the zoo's ResNet-18 and MobileNetV2 at 224x224, fidelity to the dense model as the
error, a few recovery steps) a search runs on cpu-ort-fp32; then:
  * before: the front as measured, one paired session per trial (the stored figure and its 95%
    interval as the search saw them);
  * after: the front after ``confirm_front`` (a second independent session, a third when the two
    disagree; the conservative figure; the interval widened by the between-session spread).
Every trial on either front is then re-measured ``--rounds`` times, each a fresh paired session
against the base model, the trials taken in turn so that re-measurements are minutes apart.
Reported per model and for both fronts: the share of re-measured ratios inside the stored
interval (aim >= 95%) and the worst gap between the stored ratio and a re-measured one, relative
to the re-measured ratio (aim <= 5%).

Run by hand: ``.venv/bin/python bench/confirmation.py [--trials 10] [--rounds 5] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from latency_models import registry  # noqa: E402
from search.config import cache_dir, load_search_config, resolve_profile  # noqa: E402
from search.storage import Repository  # noqa: E402
from search.study.controller import confirm_front, prepare, run_worker  # noqa: E402
from search.study.pareto import TrialPoint, pareto_front  # noqa: E402
from search.study.read import trial_points  # noqa: E402
from search.study.runtime import Runtime, load_study  # noqa: E402

TARGET = "cpu-ort-fp32"
MODELS = {"ResNet-18": "zoo_plugin:resnet18_224", "MobileNetV2": "zoo_plugin:mobilenetv2_224"}


@dataclass
class Figures:
    inside: int = 0
    total: int = 0
    worst_gap: float = 0.0

    def add(self, stored: float, interval: tuple[float, float], measured: float) -> None:
        self.total += 1
        self.inside += interval[0] <= measured <= interval[1]
        self.worst_gap = max(self.worst_gap, abs(stored - measured) / measured)

    def cells(self) -> str:
        share = 100 * self.inside / self.total if self.total else float("nan")
        return f"{self.inside}/{self.total} ({share:.0f}%) | {100 * self.worst_gap:.1f}%"


def run_model(label: str, spec: str, args: argparse.Namespace, folder: Path) -> list[str]:
    runtime = Runtime(db_url=f"sqlite:///{folder / 'confirmation.db'}", cache_dir=cache_dir(),
                      heartbeat_s=10, grace_s=30)
    config = load_search_config(None, {
        "name": f"confirm-{label.lower().replace('-', '')}", "model": spec, "targets": [TARGET],
        "trials": args.trials, "sampler": "tpe", "seed": args.seed, "recovery": {"steps": args.recovery_steps},
        "keep_ratios": [0.25, 0.5, 0.75, 1.0],
    })
    started = time.perf_counter()
    prepared = prepare(config, runtime)
    run_worker(config.name, runtime, prepared=prepared)
    search_s = time.perf_counter() - started
    record = prepared.record
    study = load_study(record, runtime)
    base_signature = record.base.signature

    def front(points: list[TrialPoint]) -> dict[int, TrialPoint]:
        return {p.trial: p for p in pareto_front(points, TARGET) if p.signature != base_signature}

    before = front(trial_points(study))  # the stored first-session figures, as the search saw them
    started = time.perf_counter()
    sessions = confirm_front(prepared, runtime)
    confirm_s = time.perf_counter() - started
    after = front(trial_points(study, record))
    repo = Repository(runtime.db_url)
    artifacts = folder / "artifacts"
    artifacts.mkdir(exist_ok=True)
    base_path = artifacts / "base.onnx"
    base_path.write_bytes(repo.get_artifact(record.base.artifact_sha256) or b"")
    paths = {}
    for number, point in {**before, **after}.items():
        paths[number] = artifacts / f"{number}.onnx"
        paths[number].write_bytes(repo.get_artifact(point.artifact_sha256) or b"")
    repo.close()
    profile = resolve_profile(TARGET, ())
    remeasured: dict[int, list[float]] = {n: [] for n in paths}
    with registry.get(profile.backend)(profile) as backend:
        for _ in range(args.rounds):
            for number, path in paths.items():
                remeasured[number].append(backend.measure_paired(path, base_path).ratio)
    first, confirmed = Figures(), Figures()
    for number, point in before.items():
        session = point.first_session[TARGET]
        for ratio in remeasured[number]:
            first.add(session.ratio, session.ratio_ci, ratio)
    for number, point in after.items():
        for ratio in remeasured[number]:
            confirmed.add(point.ratio[TARGET], point.ratio_interval[TARGET], ratio)
    print(f"{label}: before {sorted(before)}, after {sorted(after)}, sessions {sessions}", flush=True)
    for number in sorted(paths):
        point = after.get(number) or before[number]
        print(f"  trial {number}: first {point.first_session[TARGET].ratio:.4f}, shown "
              f"{point.ratio.get(TARGET, float('nan')):.4f}, re-measured "
              + ", ".join(f"{r:.4f}" for r in remeasured[number]), flush=True)
    return [
        f"| {label} | one session (before) | {len(before)} | {first.cells()} | {search_s:.0f} s search |",
        f"| {label} | confirmed (after) | {len(after)} | {confirmed.cells()} | {sessions} sessions, "
        f"{confirm_s:.0f} s |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recovery-steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    rows = []
    for label in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows += run_model(label, MODELS[label], args, Path(tmp))
    body = "\n".join([
        f"{args.trials} trials per search (tpe, seed {args.seed}, {args.recovery_steps} recovery steps, keep ratios "
        f"0.25/0.5/0.75/1), profile {TARGET} as shipped; each front trial (the base excluded) re-measured "
        f"{args.rounds} times afterwards in fresh paired sessions, trials in turn.",
        "",
        "| model | front figures | front trials | re-measurements inside the stored interval | worst gap "
        "(stored vs re-measured ratio) | cost |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    write_section("confirmation", "Front figures against re-measurement (bench/confirmation.py)",
                  f".venv/bin/python bench/confirmation.py --trials {args.trials} --rounds {args.rounds} "
                  f"--seed {args.seed}", body)
    print(body)


if __name__ == "__main__":
    main()
