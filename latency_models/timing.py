"""The timing loops shared by every backend: warm-up, timed runs and adaptive stopping.

A backend only supplies a ``Runner`` (one inference, returning its own duration); how long to
warm up, how many runs to time and when the median is known well enough is decided here, the same
way for every backend, so that figures from different targets are comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hardware_profiles import RepeatPolicy, WarmupPolicy
from latency_models.errors import MeasurementTimeout
from latency_models.stats import Summary, summarize

Runner = Callable[[], int]
"""One inference; returns its duration in nanoseconds as the backend's timer saw it."""


@dataclass(frozen=True, slots=True)
class TimedRuns:
    """Durations of the timed runs, in microseconds, and whether the precision target was met."""

    durations_us: tuple[float, ...]
    converged: bool
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class PairedRuns:
    """Interleaved durations of a candidate and a reference, and the per-pair ratios."""

    candidate_us: tuple[float, ...]
    reference_us: tuple[float, ...]
    ratios: tuple[float, ...]
    converged: bool
    elapsed_s: float


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.start = time.perf_counter()

    def check(self, stage: str) -> None:
        if time.perf_counter() - self.start > self.timeout_s:
            raise MeasurementTimeout(
                f"measurement exceeded the profile's timeout of {self.timeout_s:g} s during "
                f"{stage}; raise timeout_s or lower repeat.max_seconds"
            )


def warm_up(runners: list[Runner], policy: WarmupPolicy, deadline: _Deadline) -> None:
    start = time.perf_counter()
    count = 0
    while count < policy.runs or time.perf_counter() - start < policy.min_seconds:
        for run in runners:
            run()
        count += 1
        deadline.check("warm-up")


def time_runs(
    run: Runner, *, warmup: WarmupPolicy, repeat: RepeatPolicy, timeout_s: float
) -> TimedRuns:
    """Warm up, then time ``run`` until the median's precision target or a cap is reached."""
    deadline = _Deadline(timeout_s)
    warm_up([run], warmup, deadline)
    durations: list[float] = []
    start = time.perf_counter()
    converged = False
    while True:
        durations.append(run() / 1000.0)
        n = len(durations)
        if n >= repeat.min_runs and n % repeat.check_every == 0:
            if summarize(durations).rel_halfwidth <= repeat.target_rel_precision:
                converged = True
                break
        if n >= repeat.max_runs or time.perf_counter() - start >= repeat.max_seconds:
            converged = n >= repeat.min_runs and (
                summarize(durations).rel_halfwidth <= repeat.target_rel_precision
            )
            break
        if n % repeat.check_every == 0:
            deadline.check("timed runs")
    return TimedRuns(tuple(durations), converged, time.perf_counter() - start)


def time_paired(
    candidate: Runner,
    reference: Runner,
    *,
    warmup: WarmupPolicy,
    repeat: RepeatPolicy,
    timeout_s: float,
) -> PairedRuns:
    """Time two models interleaved (ABBA order) and stop on the precision of their ratio.

    Slow drifts of the machine (another process, clock changes) hit both members of a pair
    almost equally, so the median of per-pair ratios is far steadier than a ratio of two
    separately measured medians. ``max_seconds`` caps the time of both models together.
    """
    deadline = _Deadline(timeout_s)
    warm_up([candidate, reference], warmup, deadline)
    cand: list[float] = []
    ref: list[float] = []
    ratios: list[float] = []
    start = time.perf_counter()
    converged = False
    while True:
        # Alternate which model goes first so that neither always runs on a warmer cache.
        if len(ratios) % 2 == 0:
            a = candidate()
            b = reference()
        else:
            b = reference()
            a = candidate()
        cand.append(a / 1000.0)
        ref.append(b / 1000.0)
        ratios.append(a / b if b > 0 else float("inf"))
        n = len(ratios)
        if n >= repeat.min_runs and n % repeat.check_every == 0:
            if _ratio_converged(ratios, repeat):
                converged = True
                break
        if n >= repeat.max_runs or time.perf_counter() - start >= repeat.max_seconds:
            converged = n >= repeat.min_runs and _ratio_converged(ratios, repeat)
            break
        if n % repeat.check_every == 0:
            deadline.check("paired timed runs")
    return PairedRuns(tuple(cand), tuple(ref), tuple(ratios), converged, time.perf_counter() - start)


def _ratio_converged(ratios: list[float], repeat: RepeatPolicy) -> bool:
    summary: Summary = summarize(ratios)
    return summary.rel_halfwidth <= repeat.target_rel_precision
