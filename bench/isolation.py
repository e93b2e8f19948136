"""Measurement kept apart from training: the paired ratio of two models on ``cpu-ort-fp32`` while
0, 1 and 2 other worker processes fine-tune on this machine's CPU, with and without the device lock.

A worker is a process that trains a small CNN step after step with torch's default thread count
(what recovery uses by default), holding the device shared for each step when the lock is on. The
measurement is ``measure_paired`` of a ~10 ms CNN against its 75%-width variant, holding the device
exclusive when the lock is on, exactly as ``LocalMeter`` does. Every condition is measured once per
round, rounds interleaved, so slow drift of the machine spreads over all of them.

Reported per condition: the ratio's median and spread over the sessions (each measurement opens new
ONNX Runtime sessions), its bias against the quiet figure (no worker), how long the measurement
waited for the device, and the workers' training steps per second (what the lock costs training).
Each run is kept in ``bench/results/isolation/`` and the page's section is written from every kept
run, so the spread across sittings shows too.

Run by hand: ``.venv/bin/python bench/isolation.py [--rounds 5]`` (writes docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402
from measurement import convnet, export  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from latency_models import DeviceLock, registry  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "isolation"
CONDITIONS = [(0, False), (1, False), (1, True), (2, False), (2, True)]
WIDTH, DEPTH, RESOLUTION = 64, 4, 80  # ~10 ms on one core (bench/measurement.py)


def worker(lock_dir: Path, use_lock: bool, steps_file: Path) -> None:
    """Fine-tune a small CNN for ever, counting steps into ``steps_file`` (killed by the parent)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = convnet(WIDTH, DEPTH).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, targets = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    lock = DeviceLock(lock_dir, "cpu") if use_lock else None
    steps = 0
    while True:
        if lock is None:
            _step(model, optimizer, inputs, targets, nn.functional.cross_entropy)
        else:
            with lock.shared():
                _step(model, optimizer, inputs, targets, nn.functional.cross_entropy)
        steps += 1
        steps_file.write_text(f"{steps} {time.time()}")


def _step(model, optimizer, inputs, targets, loss_fn) -> None:  # type: ignore[no-untyped-def]
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()
    optimizer.step()


@dataclass(frozen=True)
class Sample:
    workers: int
    lock: bool
    ratio: float
    measure_s: float
    waited_s: float
    steps_per_s: float


def _read_steps(path: Path) -> tuple[int, float]:
    try:
        count, stamp = path.read_text().split()
        return int(count), float(stamp)
    except (OSError, ValueError):
        return 0, time.time()


def _measure(backend, candidate: Path, base: Path, lock: DeviceLock | None) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    waited_before = 0.0 if lock is None else lock.waited_s
    if lock is None:
        ratio = backend.measure_paired(candidate, base).result().ratio
    else:
        with lock.exclusive():
            ratio = backend.measure_paired(candidate, base).result().ratio
    waited = 0.0 if lock is None else lock.waited_s - waited_before
    return float(ratio), time.perf_counter() - started, waited


def _one(backend, files: tuple[Path, Path], workers: int, use_lock: bool, tmp: Path) -> Sample:  # type: ignore[no-untyped-def]
    lock_dir = tmp / "locks"
    steps_files = [tmp / f"steps-{workers}-{use_lock}-{i}-{time.monotonic_ns()}" for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(lock_dir), str(int(use_lock)), str(f)])
             for f in steps_files]
    try:
        deadline = time.monotonic() + 120
        while any(_read_steps(f)[0] < 3 for f in steps_files) and time.monotonic() < deadline:
            time.sleep(0.05)  # training under way before the measurement starts
        before = [_read_steps(f) for f in steps_files]
        ratio, measure_s, waited_s = _measure(backend, *files, DeviceLock(lock_dir, "cpu") if use_lock else None)
        after = [_read_steps(f) for f in steps_files]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    # Training steps all workers finished while this measurement was asked for and ran (its wall time).
    rate = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) / measure_s
    return Sample(workers, use_lock, ratio, measure_s, waited_s, rate)


def run(rounds: int) -> list[Sample]:
    profile = load_profile("cpu-ort-fp32")
    samples = []
    with tempfile.TemporaryDirectory() as folder, registry.get(profile.backend)(profile) as backend:
        tmp = Path(folder)
        base = export(convnet(WIDTH, DEPTH), RESOLUTION, tmp / "base.onnx")
        candidate = export(convnet(WIDTH * 3 // 4, DEPTH), RESOLUTION, tmp / "variant.onnx")
        for index in range(rounds):
            for workers, use_lock in CONDITIONS:
                sample = _one(backend, (candidate, base), workers, use_lock, tmp)
                samples.append(sample)
                print(f"round {index + 1}/{rounds}: {workers} worker(s), lock {'on' if use_lock else 'off'}: "
                      f"ratio {sample.ratio:.4f}, measured in {sample.measure_s:.1f} s "
                      f"(waited {sample.waited_s:.2f} s), workers {sample.steps_per_s:.1f} steps/s", flush=True)
    return samples


def _label(workers: int, use_lock: bool) -> str:
    if workers == 0:
        return "quiet"
    return f"{workers} worker{'s' if workers > 1 else ''}, lock {'on' if use_lock else 'off'}"


def _row(group: list[Sample], quiet: float, label: str) -> str:
    ratios = [s.ratio for s in group]
    median = statistics.median(ratios)
    worst = max(ratios, key=lambda r: abs(r / quiet - 1))
    waited = statistics.median(s.waited_s for s in group)
    rate = statistics.median(s.steps_per_s for s in group)
    return (f"| {label} | {len(group)} | {median:.4f} | {min(ratios):.4f}-{max(ratios):.4f} | "
            f"{100 * (median / quiet - 1):+.2f}% | {100 * (worst / quiet - 1):+.2f}% | {waited:.2f} | {rate:.1f} |")


def table(runs: list[dict[str, Any]]) -> str:
    """The section's body from every kept run: per condition, over all sessions of all runs."""
    samples = [Sample(**s) for r in runs for s in r["samples"]]
    quiet = statistics.median(s.ratio for s in samples if s.workers == 0)
    lines = [f"{len(runs)} run(s), {len(samples) // len(CONDITIONS)} sessions per condition in all. "
             "Bias: median ratio against the quiet median; worst: the session farthest from the quiet median.",
             "",
             "| condition | sessions | ratio median | ratio min-max | bias | worst session | waited s (median) | "
             "training steps/s during it (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for workers, use_lock in CONDITIONS:
        group = [s for s in samples if (s.workers, s.lock) == (workers, use_lock)]
        lines.append(_row(group, quiet, _label(workers, use_lock)))
    per_run = ", ".join(
        f"{r['finished']}: quiet {statistics.median(s['ratio'] for s in r['samples'] if s['workers'] == 0):.4f}"
        for r in runs)
    lines += ["", f"Quiet median per run: {per_run}."]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3] == "1", Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="sessions per condition in this run")
    parser.add_argument("--no-write", action="store_true", help="print only; keep nothing, write no page")
    args = parser.parse_args()
    samples = run(args.rounds)
    finished = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H-%MZ")
    record = {"finished": finished, "machine": machine(), "rounds": args.rounds,
              "samples": [asdict(s) for s in samples]}
    if args.no_write:
        print(table([record]))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{finished}.json").write_text(json.dumps(record, indent=1) + "\n")
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    body = table(runs)
    print(body)
    write_section("isolation", "Measurement kept apart from training (device lock)",
                  ".venv/bin/python bench/isolation.py --rounds 5", body)


if __name__ == "__main__":
    main()
