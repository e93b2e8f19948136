"""Robust latency statistics: order-statistic confidence intervals that assume no distribution.

Latency samples are skewed and heavy-tailed (preemption, frequency changes), so the median and a
distribution-free interval for it are used rather than mean and standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided 95% normal quantile; the binomial rank interval below uses it.
_Z95 = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Summary:
    """Statistics of one sample, in the sample's unit."""

    median: float
    p10: float
    p90: float
    mean: float
    stdev: float
    n: int
    ci_low: float
    ci_high: float

    @property
    def rel_halfwidth(self) -> float:
        """Half the width of the median's confidence interval, relative to the median."""
        if self.median == 0:
            return math.inf
        return (self.ci_high - self.ci_low) / 2 / abs(self.median)


def median_ci_ranks(n: int, z: float = _Z95) -> tuple[int, int]:
    """0-based ranks (lo, hi) of the sorted sample bounding the median at ~95% confidence.

    The count of samples below the true median is Binomial(n, 1/2); the ranks are its normal
    approximation's quantiles, widened to whole ranks (conservative for small n).
    """
    if n < 1:
        raise ValueError("need at least one sample")
    half_width = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half_width) - 1)
    hi = min(n - 1, math.ceil(n / 2 + half_width))
    return lo, hi


def summarize(samples: Sequence[float]) -> Summary:
    """Median, p10, p90, mean, sample standard deviation and the median's 95% interval."""
    values = np.sort(np.asarray(samples, dtype=np.float64))
    n = int(values.size)
    if n == 0:
        raise ValueError("no samples to summarize")
    lo, hi = median_ci_ranks(n)
    return Summary(
        median=float(np.median(values)),
        p10=float(np.percentile(values, 10)),
        p90=float(np.percentile(values, 90)),
        mean=float(values.mean()),
        stdev=float(values.std(ddof=1)) if n > 1 else 0.0,
        n=n,
        ci_low=float(values[lo]),
        ci_high=float(values[hi]),
    )


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Sample standard deviation over the mean."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        return 0.0
    return float(array.std(ddof=1) / array.mean())
