"""Multi-fidelity recovery, as NetAdapt does it: short fine-tuning while searching, long for the
chosen ones.

At the end of a search (``final_steps`` > 0), every trial on the primary target's Pareto front is
rebuilt exactly as its trial built it (checked against the measured ONNX), fine-tuned for
``final_steps`` more steps with the search's recovery settings (another seed), and scored again
on the validation data. The architecture does not change, so the measured latency stands; the
new error is stored beside the search-time one. Optuna refuses attributes on finished trials,
so the figures live on the study as ``final:<trial number>`` user attributes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.study.materialize import rebuild_trial
from search.study.read import FINAL_PREFIX, pareto_rows
from search.study.runtime import Runtime, load_study, optuna_storage

if TYPE_CHECKING:
    from search.study.controller import Prepared

logger = logging.getLogger(__name__)

PREFIX = FINAL_PREFIX


@dataclass(frozen=True, slots=True)
class FinalScore:
    """A trial's error after the final recovery, beside its search-time error."""

    trial: int
    steps: int
    error: float
    search_error: float
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def key(trial: int) -> str:
    return f"{PREFIX}{trial}"


def stored(user_attrs: Mapping[str, Any]) -> dict[int, FinalScore]:
    """Final scores by trial number from a study's user attributes."""
    return {int(name[len(PREFIX):]): FinalScore(**value) for name, value in user_attrs.items()
            if name.startswith(PREFIX)}


def recover_front(prepared: Prepared, runtime: Runtime, *, steps: int,
                  on_scored: Callable[[FinalScore], None] | None = None) -> list[FinalScore]:
    """Final recovery of the primary target's Pareto front; trials already scored with the same
    ``steps`` are skipped. Returns the scores made now."""
    record, config, bundle = prepared.record, prepared.config, prepared.bundle
    study = load_study(record, runtime, storage=optuna_storage(runtime, worker=True))
    done = stored(study.user_attrs)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    made: list[FinalScore] = []
    rows = pareto_rows(record, study, config.targets[0])
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            number = int(row["trial"])
            attrs = by_number[number].user_attrs
            if number in done and done[number].steps == steps:
                continue
            started = time.perf_counter()
            rebuilt = rebuild_trial(bundle=bundle, space=prepared.space, config=config, attrs=attrs,
                                    base_signature=record.base["signature"], artifact_dir=Path(tmp),
                                    batch_size=prepared.profiles[0].batch_size, finetune_steps=steps)
            error = rebuilt.error if rebuilt.error is not None else float(attrs["error"])
            score = FinalScore(trial=number, steps=steps, error=error, search_error=float(attrs["error"]),
                               elapsed_s=time.perf_counter() - started)
            study.set_user_attr(key(number), score.to_dict())
            logger.info("trial %d: error %.4f after search, %.4f after %d final steps", number,
                        score.search_error, error, steps)
            made.append(score)
            if on_scored is not None:
                on_scored(score)
    return made

