"""Where a search lives and how Optuna is set up for it: the runtime settings, the study's storage
and name, the sampler and the trial pruner a config names. No torch: the hub and the read side import this."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from search.config import SearchConfig
from search.config import cache_dir as default_cache_dir
from search.storage import Repository, SearchRecord
from search.storage.record import read_trials
from search.storage.study_storage import open_study_storage


@dataclass(frozen=True, slots=True)
class Runtime:
    """Where and how a search runs; none of this changes what a trial computes."""

    db_url: str
    profile_dirs: Sequence[Path] = ()
    cache_dir: Path = field(default_factory=default_cache_dir)  # the one cache folder (HWPRUNE_CACHE, else XDG)
    heartbeat_s: int = 10
    grace_s: int = 30
    worker_index: int = 0
    wait_for_agents: bool = False
    agent_live_s: float = 60.0
    # The artifact store's folder or fsspec URL; None: search.config.artifacts_url(db_url).
    artifacts_url: str | None = None
    # This process's device for model work (--device); None: the one the search's config names.
    device: str | None = None

    def repository(self) -> Repository:
        """hwprune's tables and artifact store for this runtime (close it after use)."""
        return Repository(self.db_url, artifacts=self.artifacts_url)


def study_name(search: str) -> str:
    return f"hwprune:{search}"


def package_versions() -> dict[str, str]:
    found = {}
    for package in ("hwprune", "torch", "torch-pruning", "optuna", "onnx", "onnxruntime", "sqlalchemy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def optuna_storage(runtime: Runtime, *, worker: bool = False) -> optuna.storages.RDBStorage:
    """Optuna's storage for this runtime's database; ``worker`` for a process that claims trials
    (see ``open_study_storage``)."""
    return open_study_storage(runtime.db_url, heartbeat_s=runtime.heartbeat_s, grace_s=runtime.grace_s,
                              worker=worker)


def startup_trials(config: SearchConfig) -> int:
    """Trials TPE samples at random before modelling (a quarter of the budget, 5 to 10)."""
    return max(5, min(10, (config.trials or 40) // 4))


def make_sampler(config: SearchConfig, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler the config names; each parallel worker gets its own seed."""
    seed = config.seed + worker_index
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if config.sampler in ("random", "netadapt"):  # netadapt enqueues its own plans
            return optuna.samplers.RandomSampler(seed=seed)
        if config.sampler == "nsga2":
            population = max(4, min(50, (config.trials or 40) // 4))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
        startup = startup_trials(config)
        if config.sampler == "amc":
            # AMC-style: decisions are made layer by layer within one trial; a multivariate TPE
            # (grouped by the parameters that appear together) models their interactions.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constant_liar=True, n_startup_trials=startup)
        # Classic independent TPE. Optuna 5's default TPE is already multivariate, which would
        # make `tpe` and `amc` propose the very same plans.
        return optuna.samplers.TPESampler(seed=seed, multivariate=False, constant_liar=True,
                                          n_startup_trials=startup)


def make_pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    """The trial pruner the config names (see ``SearchConfig.trial_pruning``).

    The median of completed trials' rewards before fine-tuning is compared only once as many
    trials as TPE's random start have completed, so the first comparisons are not against noise.
    """
    if config.trial_pruning == "none":
        return optuna.pruners.NopPruner()
    startup = startup_trials(config)
    return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0, n_min_trials=startup)


def find_record(name: str, runtime: Runtime) -> SearchRecord:
    """The stored search called ``name`` (``SearchNotFoundError`` lists the others)."""
    repo = runtime.repository()
    try:
        return repo.get_search(name)
    finally:
        repo.close()


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def counted(study: optuna.Study) -> int:
    """Trials that count toward ``trials``: completed ones and pruned ones (a pruned trial ran until
    it was judged hopeless; a failed one is retried), except plans screened out before they were
    tried (``search.study.screening``, "Budget-aware proposals")."""
    return sum(1 for trial in read_trials(study, [state.name for state in BUDGET_STATES])
               if trial.budget_screened is None)


def load_study(record: SearchRecord, runtime: Runtime, *,
               storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """A stored search's study; pass ``storage`` to reuse an open one instead of connecting again."""
    return optuna.load_study(study_name=record.study_name, storage=storage or optuna_storage(runtime))
