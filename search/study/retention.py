"""Which artifacts the stored searches still need, and pruning the artifact store of the rest.

Kept: each search's base model (every paired measurement is timed against it), the architectures
on any target's Pareto front (confirmations and exports use them), and the candidate and
reference of every queued or leased job (an agent downloads them through the hub). Anything else
is re-made from its trial's plan on demand; the export reproduces the sha256 it was measured with.
"""

from __future__ import annotations

from search.storage import Repository
from search.storage.artifacts import PruneReport
from search.study.pareto import pareto_front
from search.study.read import trial_points
from search.study.runtime import Runtime, load_study, optuna_storage


def needed_artifacts(repo: Repository, runtime: Runtime) -> set[str]:
    """The sha256 of every artifact a job, a search's base model or a front needs."""
    keep = repo.jobs_artifacts()
    storage = optuna_storage(runtime)
    try:
        for record in repo.list_searches():
            keep.add(record.base.artifact_sha256)
            points = trial_points(load_study(record, runtime, storage=storage), record)
            for target in record.config.targets:
                keep.update(p.artifact_sha256 for p in pareto_front(points, target) if p.artifact_sha256)
    finally:
        storage.engine.dispose()
    return keep


def prune_artifacts(runtime: Runtime, *, min_age_s: float = 600.0) -> PruneReport:
    """Remove from the artifact store what no job, base model or front needs (files younger than
    ``min_age_s`` are spared: a worker may have just stored one and not yet queued its job)."""
    repo = runtime.repository()
    try:
        return repo.artifacts.prune(needed_artifacts(repo, runtime), min_age_s=min_age_s)
    finally:
        repo.close()
