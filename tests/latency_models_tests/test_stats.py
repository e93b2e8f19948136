from __future__ import annotations

import numpy as np
import pytest

from latency_models.stats import coefficient_of_variation, median_ci_ranks, summarize


def test_summary_of_known_sample() -> None:
    summary = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert summary.median == 3.0
    assert summary.mean == 3.0
    assert summary.n == 5
    assert summary.stdev == pytest.approx(np.std([1, 2, 3, 4, 5], ddof=1))
    assert summary.ci_low <= summary.median <= summary.ci_high


def test_median_interval_covers_true_median_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    # Skewed, like latencies: lognormal whose true median is exp(0) = 1.
    covered = 0
    trials = 400
    for _ in range(trials):
        s = summarize(rng.lognormal(0.0, 0.5, 200).tolist())
        covered += s.ci_low <= 1.0 <= s.ci_high
    assert 0.92 <= covered / trials <= 0.995


def test_interval_narrows_with_more_samples() -> None:
    rng = np.random.default_rng(2)
    small = summarize(rng.normal(100, 5, 50).tolist())
    large = summarize(rng.normal(100, 5, 5000).tolist())
    assert large.rel_halfwidth < small.rel_halfwidth / 5


def test_ranks_stay_in_bounds() -> None:
    for n in range(1, 60):
        lo, hi = median_ci_ranks(n)
        assert 0 <= lo <= hi <= n - 1


def test_empty_sample_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        summarize([])


def test_coefficient_of_variation() -> None:
    assert coefficient_of_variation([10.0, 10.0, 10.0]) == 0.0
    assert coefficient_of_variation([9.0, 11.0]) == pytest.approx(np.std([9, 11], ddof=1) / 10)
