"""The AMC reward with latency in place of FLOPs: ``-error * log(latency_us)``.

Latency is in microseconds so that the logarithm is positive for every real model; with error 0
every latency scores 0 (a tie), which ``error_floor`` breaks by counting errors below the floor
as the floor: among the plans within the floor, the fastest wins.
"""

from __future__ import annotations

import math

from search.errors import SearchError

MIN_LATENCY_US = 1.0


def reward(error: float, latency_us: float, *, error_floor: float = 0.0, resource_constrained: bool = False) -> float:
    """``-max(error, error_floor) * log(latency_us)``; higher is better.

    With ``resource_constrained`` (a latency budget is set) it is AMC's resource-constrained
    reward, ``-error``: the budget is an Optuna constraint that keeps slow plans infeasible, and
    among the feasible ones the most accurate wins.

    Raises:
        SearchError: a latency of 1 us or less (the logarithm would flip the ranking) or an
            error outside [0, 1].
    """
    if not latency_us > MIN_LATENCY_US or math.isinf(latency_us):
        raise SearchError(
            f"latency {latency_us!r} us is outside (1 us, inf): the reward's log(latency) needs "
            "more than 1 us; check the backend's timer"
        )
    if not 0.0 <= error <= 1.0:
        raise SearchError(f"error must be in [0, 1], got {error!r}: check the model's error function")
    if resource_constrained:
        return -error
    return -max(error, error_floor) * math.log(latency_us)
