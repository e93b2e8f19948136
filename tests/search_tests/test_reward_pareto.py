from __future__ import annotations

import math
import random

import pytest

from search.errors import SearchError
from search.study.pareto import TrialPoint, dominates, pareto_front
from search.study.reward import reward


def test_reward_is_amc_with_latency() -> None:
    assert reward(0.1, 1000.0) == pytest.approx(-0.1 * math.log(1000.0))
    assert reward(0.1, 500.0) > reward(0.1, 1000.0)  # faster is better at equal error
    assert reward(0.05, 1000.0) > reward(0.1, 1000.0)  # more accurate is better at equal latency


def test_error_zero_ties_unless_floored() -> None:
    assert reward(0.0, 100.0) == reward(0.0, 10_000.0) == 0.0
    assert reward(0.0, 100.0, error_floor=0.01) > reward(0.0, 10_000.0, error_floor=0.01)
    assert reward(0.2, 100.0, error_floor=0.01) == reward(0.2, 100.0)


@pytest.mark.parametrize("latency", [1.0, 0.5, 0.0, -3.0, float("nan"), float("inf")])
def test_latency_guard(latency: float) -> None:
    with pytest.raises(SearchError, match=r"outside \(1 us, inf\)"):
        reward(0.1, latency)


@pytest.mark.parametrize("error", [-0.1, 1.5, float("nan")])
def test_error_range(error: float) -> None:
    with pytest.raises(SearchError, match=r"error must be in \[0, 1\]"):
        reward(error, 100.0)


def _brute_force(points: list[TrialPoint], target: str) -> set[int]:
    feasible = [p for p in points if p.feasible]
    return {
        p.trial
        for p in feasible
        if not any(dominates((q.error, q.latency_us[target]), (p.error, p.latency_us[target])) for q in feasible)
    }


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    points = [
        TrialPoint(
            trial=i,
            # Coarse values force ties in one or both coordinates.
            error=rng.choice([0.0, 0.01, 0.02, 0.05, 0.1]),
            latency_us={"t": float(rng.randint(10, 20)), "u": float(rng.randint(1, 100))},
            macs=0, params=0, reward=None, feasible=rng.random() > 0.15,
        )
        for i in range(rng.randint(1, 60))
    ]
    for target in ("t", "u"):
        front = pareto_front(points, target)
        assert {p.trial for p in front} == _brute_force(points, target)
        latencies = [p.latency_us[target] for p in front]
        assert latencies == sorted(latencies)


def test_pareto_ignores_points_without_the_target() -> None:
    a = TrialPoint(0, 0.1, {"t": 10.0}, 0, 0, None, True)
    b = TrialPoint(1, 0.2, {"u": 5.0}, 0, 0, None, True)
    assert pareto_front([a, b], "t") == [a]


def test_samplers_differ() -> None:
    """tpe (independent) and amc (multivariate) must not propose the same plans."""
    import optuna

    from search.config import load_search_config
    from search.study.runtime import make_sampler

    def proposals(sampler_name: str) -> list[dict[str, int]]:
        config = load_search_config(None, {"name": "s", "example": "digits", "sampler": sampler_name, "trials": 24})
        study = optuna.create_study(sampler=make_sampler(config))
        study.optimize(lambda t: float(sum((t.suggest_int(f"k{i}", 0, 6) - 3) ** 2 for i in range(6))),
                       n_trials=20)
        return [t.params for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tpe, amc = proposals("tpe"), proposals("amc")
    assert tpe[:6] == amc[:6]  # the same seeded random start-up
    assert tpe[6:] != amc[6:]


def test_the_shown_front_never_holds_an_unconfirmed_prediction() -> None:
    from search.study.read import shown_front

    def point(trial: int, error: float, latency: float, *, confirmed: bool, predicted: bool = False) -> TrialPoint:
        return TrialPoint(trial, error, {"t": latency}, 0, 0, None, True,
                          confirmed={"t": confirmed}, predicted={"t": predicted})

    measured = point(0, 0.10, 100.0, confirmed=True)
    predicted = point(1, 0.05, 80.0, confirmed=False, predicted=True)  # would dominate trial 0
    lucky = point(2, 0.20, 50.0, confirmed=False)  # measured once: shown, marked unconfirmed
    assert [p.trial for p in shown_front([measured, predicted, lucky], "t")] == [2, 0]
    # Once confirmation has measured it, the formerly predicted trial takes its place.
    confirmed = point(1, 0.05, 80.0, confirmed=True, predicted=True)
    assert [p.trial for p in shown_front([measured, confirmed, lucky], "t")] == [2, 1]
