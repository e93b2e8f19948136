"""NetAdapt (Yang et al., ECCV 2018) as a search strategy over Optuna's ask/tell.

Each step lowers the latency target by ``decay`` of the base latency from the current model's
measured latency. For each group, the smallest cut (the widest option) that the latency table
(the sensitivity scan: per-group savings taken as additive) says meets the target becomes one
candidate plan; the candidates are enqueued and run as ordinary trials (short recovery, error,
export, paired measurement, stored like every other trial). Of the candidates whose *measured*
latency meets the target, the most accurate becomes the next step's model (the fastest when
none meets it). The loop ends at the trial budget or when no group can be cut further; a
resumed search continues the stored walk.

The steps run one after another in one worker (each depends on the previous step's results).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import optuna

from search.pipeline.space import SearchSpace
from search.storage.record import TrialRecord, WalkStep, enqueue, read_trials, read_walk, write_walk
from search.study.sensitivity import Sensitivity, to_params

logger = logging.getLogger(__name__)

DEFAULT_DECAY = 0.08


def candidates(space: SearchSpace, sensitivity: Sensitivity, current: Mapping[str, int],
               target_ratio: float) -> list[dict[str, int]]:
    """For each group, the widest cut below its current option whose estimated latency meets
    ``target_ratio`` (the narrowest option when none does, if narrower than now)."""
    found: list[dict[str, int]] = []
    for group in space.groups:
        now = current[group.name]
        chosen: int | None = None
        for index in range(now - 1, -1, -1):
            trial = {**current, group.name: index}
            chosen = index
            if sensitivity.estimate(trial, space)[1] <= target_ratio:
                break
        if chosen is not None:
            found.append({**current, group.name: chosen})
    return found


def _indices(space: SearchSpace, params: Mapping[str, object]) -> dict[str, int]:
    return {g.name: int(params[f"keep:{g.name}"]) for g in space.groups}  # type: ignore[call-overload]


def _latency_ratio(trial: TrialRecord, target: str) -> float:
    return trial.latency[target].ratio


def run(
    study: optuna.Study,
    space: SearchSpace,
    sensitivity: Sensitivity,
    *,
    target: str,
    budget: int | None,
    run_batch: Callable[[int], object],
    decay: float = DEFAULT_DECAY,
) -> int:
    """Drive NetAdapt's steps until ``budget`` completed trials (``None``: until nothing can be
    cut). ``run_batch(n)`` runs trials until the study holds ``n`` completed ones (it claims the
    enqueued ones first). A resumed search continues its stored walk from the last model it
    kept, so a walk that had nothing left to cut ends at once instead of starting over (which
    added trials repeating its first steps). Returns the steps run by this call."""
    current = {g.name: len(g.kept) - 1 for g in space.groups}
    current_ratio = 1.0
    steps = 0
    walk = read_walk(study)
    if walk:
        last = walk[-1]
        current = _indices(space, study.get_trials(deepcopy=False)[last.trial].params)
        current_ratio, steps = last.latency_ratio, last.step
    resumed_at = steps
    while True:
        done = read_trials(study, ["COMPLETE"])
        if budget is not None and len(done) >= budget:
            break
        target_ratio = current_ratio - decay
        proposals = candidates(space, sensitivity, current, target_ratio)
        if not proposals:
            logger.info("netadapt: nothing left to cut after %d steps", steps)
            break
        steps += 1
        for indices in proposals:
            enqueue(study, to_params(space, indices), netadapt_step=steps)
        waiting = read_trials(study, ["WAITING"])
        goal = len(done) + len(waiting)  # the dense trial 0 may still be waiting before step 1
        run_batch(goal if budget is None else min(goal, budget))
        ran = [t for t in read_trials(study, ["COMPLETE"])
               if t.netadapt_step == steps and t.latency and t.error is not None]
        if not ran:
            break
        meeting = [t for t in ran if _latency_ratio(t, target) <= target_ratio]
        if meeting:
            chosen = min(meeting, key=lambda t: (t.error or 0.0, _latency_ratio(t, target)))
        else:
            chosen = min(ran, key=lambda t: _latency_ratio(t, target))
        current = _indices(space, chosen.params)
        current_ratio = _latency_ratio(chosen, target)
        walk.append(WalkStep(steps, target_ratio, chosen.number, current_ratio, chosen.error or 0.0, bool(meeting),
                             len(ran)))
        write_walk(study, walk)
        logger.info("netadapt step %d: target %.3f, kept trial %d (latency %.3f, error %.4f)", steps,
                    target_ratio, chosen.number, current_ratio, chosen.error or 0.0)
    return steps - resumed_at
