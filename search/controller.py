"""Create or resume a search, run its trials, and read it back.

Optuna's RDB storage holds the study and every trial (plans are trial params, figures are user
attributes); hwprune's tables hold the search definition, artifacts and the latency cache. The
heartbeat makes a trial whose process died (SIGKILL, power loss) FAIL after the grace period and
enqueues a retry with the same plan.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from hardware_profiles import HardwareProfile
from latency_models import registry
from search.bundle import ModelBundle, load_bundle
from search.config import SearchConfig, incompatibilities, resolve_profile
from search.errors import ConfigError, StorageError
from search.export import export_onnx
from search.latency import LocalMeter, Meter, RemoteMeter, measure_base
from search.objective import KNOWN_ERRORS, SearchContext, run_trial
from search.pareto import TrialPoint, pareto_front
from search.pruning import architecture_signature
from search.space import SearchSpace, build_space
from search.storage import Repository, SearchRecord
from search.storage.queue import JobQueue

logger = logging.getLogger(__name__)

TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


@dataclass(frozen=True, slots=True)
class Runtime:
    """Where and how a search runs; none of this changes what a trial computes."""

    db_url: str
    profile_dirs: Sequence[Path] = ()
    cache_dir: Path = Path(".hwprune-cache")
    heartbeat_s: int = 10
    grace_s: int = 30
    worker_index: int = 0
    wait_for_agents: bool = False
    agent_live_s: float = 60.0


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


def optuna_storage(runtime: Runtime) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with the heartbeat on and a retry for trials whose process died."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat: experimental, wanted
        try:
            return optuna.storages.RDBStorage(
                runtime.db_url,
                engine_kwargs={"connect_args": {"timeout": 60}} if runtime.db_url.startswith("sqlite") else None,
                heartbeat_interval=runtime.heartbeat_s,
                grace_period=runtime.grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
        except Exception as exc:  # SQLAlchemy or driver errors surface as many types
            raise StorageError(f"Optuna cannot open the database: {exc}") from exc


def make_sampler(config: SearchConfig, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler the config names; each parallel worker gets its own seed."""
    seed = config.seed + worker_index
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if config.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if config.sampler == "nsga2":
            population = max(4, min(50, (config.trials or 40) // 4))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
        startup = max(5, min(10, (config.trials or 40) // 4))
        if config.sampler == "amc":
            # AMC-style: decisions are made layer by layer within one trial; a multivariate TPE
            # (grouped by the parameters that appear together) models their interactions.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constant_liar=True, n_startup_trials=startup)
        # Classic independent TPE. Optuna 5's default TPE is already multivariate, which would
        # make `tpe` and `amc` propose the very same plans.
        return optuna.samplers.TPESampler(seed=seed, multivariate=False, constant_liar=True,
                                          n_startup_trials=startup)


@dataclass
class Prepared:
    """A search ready to run: its definition, model, space and base figures."""

    record: SearchRecord
    config: SearchConfig
    bundle: ModelBundle
    space: SearchSpace
    profiles: list[HardwareProfile]


def _load_model_and_space(
    config: SearchConfig, runtime: Runtime
) -> tuple[ModelBundle, SearchSpace, list[HardwareProfile]]:
    profiles = [resolve_profile(name, runtime.profile_dirs) for name in config.targets]
    bundle = load_bundle(config.model_spec, cache_dir=runtime.cache_dir)
    space = build_space(bundle.model, bundle.example_input, profiles,
                        keep_ratios=config.keep_ratios, ignored=config.ignored_layers)
    return bundle, space, profiles


def prepare(config: SearchConfig, runtime: Runtime) -> Prepared:
    """Create the search, or check that it may resume with this config.

    Nothing is written before the config, profiles, model and space are known to be valid. A
    new search measures the base model (error and latency per target) and enqueues it as
    trial 0.

    Raises:
        ConfigError: the stored search differs in something other than its budget.
    """
    repo = Repository(runtime.db_url)
    try:
        existing = repo.find_search(config.name)
        if existing is not None:
            stored = SearchConfig.model_validate(existing.config)
            differences = incompatibilities(stored, config)
            if differences:
                raise ConfigError(
                    f"search {config.name!r} exists with another configuration ({'; '.join(differences)}): "
                    f"resume it with `hwprune search resume {config.name}` or choose a new --name"
                )
        bundle, space, profiles = _load_model_and_space(config, runtime)
        check_targets(profiles, repo, runtime)
        if existing is not None:
            _check_same_base(existing, bundle, space)
            # Optuna checks its own schema when its storage opens: open it before the budget
            # changes, so that a refused resume leaves the stored search as it was.
            optuna_storage(runtime).engine.dispose()
            repo.update_budget(config.name, trials=config.trials, timeout_s=config.timeout_s)
            record = repo.get_search(config.name)
        else:
            record = _create(config, runtime, repo, bundle, space, profiles)
        return Prepared(record, config, bundle, space, profiles)
    finally:
        repo.close()


def check_targets(profiles: Sequence[HardwareProfile], repo: Repository, runtime: Runtime) -> None:
    """Refuse local targets whose backend cannot run here, and remote targets that no live agent
    serves (unless told to wait for agents), before anything is stored."""
    for profile in profiles:
        if profile.location == "local":
            with registry.get(profile.backend)(profile):
                pass
    if runtime.wait_for_agents:
        return
    queue = JobQueue(repo.engine)
    for profile in profiles:
        if profile.location == "remote" and not queue.live_agents(profile.name, runtime.agent_live_s):
            raise ConfigError(
                f"no live agent serves remote profile {profile.name!r}: register one with `hwprune "
                f"agents add NAME --profile {profile.name}`, start `hwprune serve`, run `hwprune agent "
                f"--server URL --token TOKEN --profile {profile.name}` on the device, or pass --wait-for-agents"
            )


def _check_same_base(record: SearchRecord, bundle: ModelBundle, space: SearchSpace) -> None:
    if record.base_fingerprint != bundle.fingerprint():
        raise ConfigError(
            f"search {record.name!r} was made with another base model (fingerprint "
            f"{record.base_fingerprint[:12]}, now {bundle.fingerprint()[:12]}): its trials cannot be "
            "reproduced; start a new search"
        )
    if record.space_fingerprint != space.fingerprint():
        raise ConfigError(
            f"search {record.name!r} was made over another pruning space ({record.space_fingerprint}, "
            f"now {space.fingerprint()}): the profiles' channel multiples or N:M patterns changed"
        )


def _create(
    config: SearchConfig,
    runtime: Runtime,
    repo: Repository,
    bundle: ModelBundle,
    space: SearchSpace,
    profiles: list[HardwareProfile],
) -> SearchRecord:
    base_error = float(bundle.error_fn(bundle.model, bundle.val_loader))
    signature = architecture_signature(bundle.model, {})
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_onnx(bundle.model, bundle.example_input, Path(tmp),
                               batch_size=profiles[0].batch_size)
        repo.put_artifact(artifact.sha256, artifact.path.read_bytes())
        measurements = {
            p.name: measure_base(p, artifact.path, repo=repo, sha256=artifact.sha256,
                                 signature=signature).to_dict()
            for p in profiles
        }
    record = SearchRecord(
        name=config.name,
        study_name=study_name(config.name),
        config=config.model_dump(mode="json"),
        base_fingerprint=bundle.fingerprint(),
        space_fingerprint=space.fingerprint(),
        space=space.to_dict(),
        base={
            "error": base_error,
            "macs": space.base_macs,
            "params": space.base_params,
            "signature": signature,
            "artifact_sha256": artifact.sha256,
            "measurements": measurements,
        },
        versions=package_versions(),
        created_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
    )
    directions: list[optuna.study.StudyDirection] = (
        [optuna.study.StudyDirection.MAXIMIZE] if config.objective == "reward"
        else [optuna.study.StudyDirection.MINIMIZE] * (1 + len(profiles))
    )
    storage = optuna_storage(runtime)
    study = optuna.create_study(study_name=record.study_name, storage=storage,
                                directions=directions, load_if_exists=True)
    if not study.trials:
        study.enqueue_trial(space.dense_params(), user_attrs={"base": True})
    repo.add_search(record)
    logger.info("created search %s (%d groups, %d N:M layers)", config.name, len(space.groups), len(space.sparsity))
    return record


def find_record(name: str, runtime: Runtime) -> SearchRecord:
    """The stored search called ``name`` (``SearchNotFoundError`` lists the others)."""
    repo = Repository(runtime.db_url)
    try:
        return repo.get_search(name)
    finally:
        repo.close()


def load_prepared(name: str, runtime: Runtime) -> Prepared:
    """A stored search with its model and space rebuilt and checked against what was stored."""
    record = find_record(name, runtime)
    config = SearchConfig.model_validate(record.config)
    bundle, space, profiles = _load_model_and_space(config, runtime)
    _check_same_base(record, bundle, space)
    return Prepared(record, config, bundle, space, profiles)


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


class _StopRules:
    """Stop once the asked number of trials completed, or when trials keep failing."""

    def __init__(self, target: int | None, max_failures: int) -> None:
        self.target = target
        self.max_failures = max_failures
        self.failures = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failures += 1
            if self.failures >= self.max_failures:
                logger.error("stopping: %d trials failed in this run", self.failures)
                study.stop()
        if self.target is not None and completed(study) >= self.target:
            study.stop()


def run_worker(
    name: str,
    runtime: Runtime,
    *,
    on_trial: TrialCallback | None = None,
    prepared: Prepared | None = None,
) -> optuna.Study:
    """Run trials of an existing search until its budget is met (or this run's timeout)."""
    if prepared is None:
        prepared = load_prepared(name, runtime)
    config = prepared.config
    record = prepared.record
    storage = optuna_storage(runtime)
    study = optuna.load_study(study_name=record.study_name, storage=storage,
                              sampler=make_sampler(config, runtime.worker_index))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # A trial of a killed worker is failed (and retried) once its heartbeat is stale.
        optuna.storages.fail_stale_trials(study)
    if config.trials is not None and completed(study) >= config.trials:
        return study
    repo = Repository(runtime.db_url)
    base_content = repo.get_artifact(record.base["artifact_sha256"])
    if base_content is None:
        raise StorageError(f"the base model artifact of search {name!r} is missing from the database")
    artifact_dir = runtime.cache_dir / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    base_path = artifact_dir / f"{record.base['artifact_sha256']}.onnx"
    if not base_path.exists():
        partial = base_path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(base_content)
        partial.replace(base_path)
    with ExitStack() as stack:
        stack.callback(repo.close)
        meters: list[Meter] = []
        for profile in prepared.profiles:
            base_median = record.base["measurements"][profile.name]["median_us"]
            if profile.location == "remote":
                meter: Meter = RemoteMeter(
                    profile, repo, base_sha256=record.base["artifact_sha256"],
                    base_signature=record.base["signature"], base_median_us=base_median)
            else:
                meter = LocalMeter(profile, repo, base_path=base_path,
                                   base_sha256=record.base["artifact_sha256"],
                                   base_signature=record.base["signature"], base_median_us=base_median)
            stack.enter_context(meter)
            meters.append(meter)
        ctx = SearchContext(
            config=config, bundle=prepared.bundle, space=prepared.space, meters=meters, repo=repo,
            artifact_dir=artifact_dir, batch_size=prepared.profiles[0].batch_size,
            base_error=record.base["error"], base_signature=record.base["signature"],
        )
        callbacks: list[TrialCallback] = [_StopRules(config.trials, max(10, config.trials or 10))]
        if on_trial is not None:
            callbacks.append(on_trial)
        study.optimize(
            lambda trial: run_trial(trial, ctx),
            timeout=config.timeout_s,
            catch=KNOWN_ERRORS,
            callbacks=callbacks,
            gc_after_trial=False,
            show_progress_bar=False,
        )
    return study


def load_study(record: SearchRecord, runtime: Runtime, *,
               storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """A stored search's study; pass ``storage`` to reuse an open one instead of connecting again."""
    return optuna.load_study(study_name=record.study_name, storage=storage or optuna_storage(runtime))


def trial_points(study: optuna.Study) -> list[TrialPoint]:
    """Every completed trial with its stored figures."""
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if "error" not in attrs:
            continue
        constraints = trial.constraints.values()
        points.append(
            TrialPoint(
                trial=trial.number,
                error=float(attrs["error"]),
                latency_us=dict(attrs.get("latency_us", {})),
                macs=int(attrs.get("macs", 0)),
                params=int(attrs.get("params", 0)),
                reward=attrs.get("reward"),
                feasible=all(v <= 0 for v in constraints),
                plan=attrs.get("plan", {}),
                signature=str(attrs.get("signature", "")),
                artifact_sha256=str(attrs.get("artifact_sha256", "")),
            )
        )
    return points


def summary(record: SearchRecord, study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best reward and the base figures, for ``search status``."""
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    points = trial_points(study)
    rewards = [p.reward for p in points if p.reward is not None and p.feasible]
    return {
        "name": record.name,
        "targets": record.config["targets"],
        "objective": record.config["objective"],
        "sampler": record.config["sampler"],
        "trials_asked": record.config["trials"],
        "trials": states,
        "completed": states.get("COMPLETE", 0),
        "best_reward": max(rewards) if rewards else None,
        "base_error": record.base["error"],
        "base_latency_us": {k: v["median_us"] for k, v in record.base["measurements"].items()},
        "created_at": record.created_at.isoformat(),
    }


def replace_budget(config: SearchConfig, *, trials: int | None, timeout_s: float | None) -> SearchConfig:
    data = config.model_dump()
    if trials is not None:
        data["trials"] = trials
    if timeout_s is not None:
        data["timeout_s"] = timeout_s
    return SearchConfig.model_validate(data)




def pareto_rows(record: SearchRecord, study: optuna.Study, target: str) -> list[dict[str, Any]]:
    """The Pareto front on ``target`` as rows with speedups and accuracy change against the base."""
    if target not in record.config["targets"]:
        raise ConfigError(f"target {target!r} is not one of this search's: {', '.join(record.config['targets'])}")
    base = record.base
    base_latency = {k: v["median_us"] for k, v in base["measurements"].items()}
    rows = []
    for point in pareto_front(trial_points(study), target):
        rows.append({
            "trial": point.trial,
            "error": point.error,
            "accuracy": point.accuracy,
            "accuracy_change": (base["error"] - point.error),
            "latency_us": dict(point.latency_us),
            "speedup": {k: base_latency[k] / v for k, v in point.latency_us.items() if v > 0},
            "macs": point.macs,
            "params": point.params,
            "reward": point.reward,
        })
    return rows
