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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from search.pipeline.device import replay_device
from search.storage.record import FinalScore, read_final_scores, read_trials, write_final_score
from search.study.materialize import rebuild_trial
from search.study.read import pareto_rows
from search.study.runtime import Runtime, load_study, optuna_storage

if TYPE_CHECKING:
    from search.study.controller import Prepared

__all__ = ["FinalScore", "recover_front"]

logger = logging.getLogger(__name__)


def recover_front(prepared: Prepared, runtime: Runtime, *, steps: int,
                  on_scored: Callable[[FinalScore], None] | None = None) -> list[FinalScore]:
    """Final recovery of the primary target's Pareto front; trials already scored with the same
    ``steps`` are skipped. Returns the scores made now."""
    record, config, bundle = prepared.record, prepared.config, prepared.bundle
    study = load_study(record, runtime, storage=optuna_storage(runtime, worker=True))
    done = read_final_scores(study)
    by_number = {t.number: t for t in read_trials(study)}
    made: list[FinalScore] = []
    rows = pareto_rows(record, study, config.targets[0])
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            trial = by_number[row.trial]
            if row.trial in done and done[row.trial].steps == steps:
                continue
            started = time.perf_counter()
            rebuilt = rebuild_trial(bundle=bundle, space=prepared.space, config=config, plan=trial.plan or {},
                                    artifact_sha256=trial.artifact_sha256,
                                    base_signature=record.base.signature, artifact_dir=Path(tmp),
                                    batch_size=prepared.profiles[0].batch_size, finetune_steps=steps,
                                    device=replay_device(trial.model_device, None, trial=row.trial))
            search_error = float(trial.error or 0.0)
            error = rebuilt.error if rebuilt.error is not None else search_error
            score = FinalScore(trial=row.trial, steps=steps, error=error, search_error=search_error,
                               elapsed_s=time.perf_counter() - started)
            write_final_score(study, score)
            logger.info("trial %d: error %.4f after search, %.4f after %d final steps", row.trial,
                        score.search_error, error, steps)
            made.append(score)
            if on_scored is not None:
                on_scored(score)
    return made
