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
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from hardware_profiles import HardwareProfile
from latency_models import registry
from search import confirmation
from search.bundle import ModelBundle, load_bundle, seeded_error
from search.config import SearchConfig, incompatibilities, resolve_error_floor, resolve_profile
from search.confirmation import Confirmation
from search.errors import ConfigError, StorageError
from search.export import export_onnx
from search.latency import LocalMeter, Meter, RemoteMeter, measure_base
from search.objective import KNOWN_ERRORS, SearchContext, run_trial
from search.pareto import TrialPoint, pareto_front
from search.pruning import architecture_signature
from search.reward import reward
from search.space import SearchSpace, build_space
from search.storage import Repository, SearchRecord
from search.storage.queue import JobQueue
from search.storage.study_storage import open_study_storage
from search.trial_loop import LoopLimits, TrialCallback, run_trials

logger = logging.getLogger(__name__)

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


def optuna_storage(runtime: Runtime, *, worker: bool = False) -> optuna.storages.RDBStorage:
    """Optuna's storage for this runtime's database; ``worker`` for a process that claims trials
    (see ``open_study_storage``)."""
    return open_study_storage(runtime.db_url, heartbeat_s=runtime.heartbeat_s, grace_s=runtime.grace_s,
                              worker=worker)


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
    base_error = seeded_error(bundle, bundle.model, config.seed)
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
            "error_floor": resolve_error_floor(config, base_error),
        },
        versions=package_versions(),
        created_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
    )
    directions: list[optuna.study.StudyDirection] = (
        [optuna.study.StudyDirection.MAXIMIZE] if config.objective == "reward"
        else [optuna.study.StudyDirection.MINIMIZE] * (1 + len(profiles))
    )
    storage = optuna_storage(runtime, worker=True)
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


def _base_artifact(record: SearchRecord, repo: Repository, runtime: Runtime) -> tuple[Path, Path]:
    """The artifact folder and the base model's ONNX file in it, written from the database once."""
    base_content = repo.get_artifact(record.base["artifact_sha256"])
    if base_content is None:
        raise StorageError(f"the base model artifact of search {record.name!r} is missing from the database")
    artifact_dir = runtime.cache_dir / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    base_path = artifact_dir / f"{record.base['artifact_sha256']}.onnx"
    if not base_path.exists():
        partial = base_path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(base_content)
        partial.replace(base_path)
    return artifact_dir, base_path


def _open_meters(prepared: Prepared, repo: Repository, base_path: Path, stack: ExitStack) -> list[Meter]:
    """One meter per target (local or remote), entered on ``stack``."""
    record = prepared.record
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
    return meters


def error_floor_of(record: SearchRecord) -> float:
    """The reward's error floor as resolved when the search was created."""
    if "error_floor" in record.base:
        return float(record.base["error_floor"])
    return resolve_error_floor(SearchConfig.model_validate(record.config), record.base["error"])


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
    storage = optuna_storage(runtime, worker=True)
    study = optuna.load_study(study_name=record.study_name, storage=storage,
                              sampler=make_sampler(config, runtime.worker_index))
    if config.trials is not None and completed(study) >= config.trials:
        return study
    repo = Repository(runtime.db_url)
    with ExitStack() as stack:
        stack.callback(repo.close)
        artifact_dir, base_path = _base_artifact(record, repo, runtime)
        meters = _open_meters(prepared, repo, base_path, stack)
        ctx = SearchContext(
            config=config, bundle=prepared.bundle, space=prepared.space, meters=meters, repo=repo,
            artifact_dir=artifact_dir, batch_size=prepared.profiles[0].batch_size,
            base_error=record.base["error"], base_signature=record.base["signature"],
            error_floor=error_floor_of(record),
        )
        callbacks: list[TrialCallback] = [] if on_trial is None else [on_trial]
        limits = LoopLimits(trials=config.trials, timeout_s=config.timeout_s,
                            max_consecutive_failures=config.max_consecutive_failures)
        result = run_trials(study, storage, lambda trial: run_trial(trial, ctx), limits, callbacks=callbacks)
        logger.info("worker %d: %d trials completed, %d failed, %d finished by other workers",
                    runtime.worker_index, result.completed, result.failed, result.taken_over)
    return study


ConfirmCallback = Callable[[int, str, Confirmation], None]


def confirm_front(prepared: Prepared, runtime: Runtime, *, on_confirmed: ConfirmCallback | None = None) -> int:
    """Confirm every trial on the search's fronts (one per target) with independent sessions.

    When anything needs confirming, the base model is first measured again on each local target,
    so that absolute latencies track the machine as it is now. Then, until every front holds only
    confirmed figures, each unconfirmed front architecture is measured in a fresh paired session
    (a third when the two disagree); a confirmation that raises a trial's figure can push it off
    the front and let another in, which is confirmed in turn. A measurement that fails leaves its
    trial unconfirmed, with a warning. Returns the number of sessions measured.
    """
    record = prepared.record
    study = load_study(record, runtime, storage=optuna_storage(runtime, worker=True))
    if not _unconfirmed_front(record, study):
        return 0
    repo = Repository(runtime.db_url)
    sessions = 0
    failed: set[tuple[str, str]] = set()
    with ExitStack() as stack:
        stack.callback(repo.close)
        artifact_dir, base_path = _base_artifact(record, repo, runtime)
        base_now = dict(study.user_attrs.get(confirmation.BASE_NOW_KEY, {}))
        for profile in prepared.profiles:
            # Remote targets keep the base figure their agent measured when the search began.
            if profile.location == "local":
                base_now[profile.name] = measure_base(
                    profile, base_path, repo=repo, sha256=record.base["artifact_sha256"],
                    signature=record.base["signature"]).median_us
        study.set_user_attr(confirmation.BASE_NOW_KEY, base_now)
        meters = {m.profile.name: m for m in _open_meters(prepared, repo, base_path, stack)}
        for _ in range(completed(study) * len(meters) + 1):  # each pass settles at least one
            todo = [(t, p) for t, p in _unconfirmed_front(record, study) if (t, p.signature) not in failed]
            if not todo:
                break
            for target, point in todo:
                try:
                    verdict = _confirm_one(meters[target], point, target, repo, artifact_dir)
                except KNOWN_ERRORS as exc:
                    failed.add((target, point.signature))
                    logger.warning("trial %d stays unconfirmed on %s: %s", point.trial, target, exc)
                    continue
                sessions += len(verdict.sessions) - 1
                study.set_user_attr(confirmation.key(target, point.signature), verdict.to_dict())
                if on_confirmed is not None:
                    on_confirmed(point.trial, target, verdict)
    return sessions


def _confirm_one(meter: Meter, point: TrialPoint, target: str, repo: Repository,
                 artifact_dir: Path) -> Confirmation:
    path = artifact_dir / f"{point.artifact_sha256}.onnx"
    if not path.exists():
        content = repo.get_artifact(point.artifact_sha256)
        if content is None:
            raise StorageError(f"trial {point.trial}'s ONNX artifact is missing from the database")
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(content)
        partial.replace(path)
    first = point.first_session[target]
    found = [first]
    started = time.perf_counter()
    while confirmation.needs_another(found):
        measured = meter.confirm(path, point.artifact_sha256, point.signature, session=len(found)).result()
        found.append(confirmation.Session(measured.ratio, measured.ratio_ci))
    verdict = confirmation.conclude(found, elapsed_s=time.perf_counter() - started)
    logger.info("trial %d on %s: ratio %s -> %.4f", point.trial, target,
                " / ".join(f"{s.ratio:.4f}" for s in found), verdict.ratio)
    return verdict


def _unconfirmed_front(record: SearchRecord, study: optuna.Study) -> list[tuple[str, TrialPoint]]:
    """Unconfirmed architectures on any target's front (mixed figures), one trial each."""
    points = trial_points(study, record)
    todo: dict[tuple[str, str], TrialPoint] = {}
    for target in record.config["targets"]:
        for point in pareto_front(points, target):
            if not point.confirmed.get(target):
                todo.setdefault((target, point.signature), point)
    return [(target, point) for (target, _), point in todo.items()]


def load_study(record: SearchRecord, runtime: Runtime, *,
               storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """A stored search's study; pass ``storage`` to reuse an open one instead of connecting again."""
    return optuna.load_study(study_name=record.study_name, storage=storage or optuna_storage(runtime))


def base_latency_us(record: SearchRecord, study: optuna.Study) -> dict[str, float]:
    """The base model's latency per target: as re-measured at the last confirmation, else as
    measured when the search was created."""
    now = study.user_attrs.get(confirmation.BASE_NOW_KEY, {})
    return {target: float(now.get(target, m["median_us"])) for target, m in record.base["measurements"].items()}


def trial_points(study: optuna.Study, record: SearchRecord | None = None) -> list[TrialPoint]:
    """Every completed trial with its figures; with ``record``, latencies are confirmed ratios
    where confirmed (else first sessions) times the base model's current latency."""
    confirmations = confirmation.stored(study.user_attrs) if record is not None else {}
    base_now = base_latency_us(record, study) if record is not None else {}
    base_signature = record.base["signature"] if record is not None else None
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        if "error" not in attrs:
            continue
        signature = str(attrs.get("signature", ""))
        latency_us = dict(attrs.get("latency_us", {}))
        ratios: dict[str, float] = {}
        intervals: dict[str, tuple[float, float]] = {}
        confirmed: dict[str, bool] = {}
        first: dict[str, confirmation.Session] = {}
        for target, figures in attrs.get("latency", {}).items():
            first[target] = confirmation.Session.from_dict(figures)
            verdict = confirmations.get((target, signature))
            if signature == base_signature:  # the reference itself: 1 by definition
                ratios[target], intervals[target], confirmed[target] = 1.0, (1.0, 1.0), True
            elif verdict is not None:
                ratios[target], intervals[target], confirmed[target] = verdict.ratio, verdict.interval, True
            else:
                ratios[target], intervals[target] = first[target].ratio, first[target].ratio_ci
                confirmed[target] = False
            if target in base_now:
                latency_us[target] = ratios[target] * base_now[target]
        constraints = dict(trial.constraints)
        if record is not None:
            _constraints_on_shown_figures(constraints, record, ratios, latency_us)
        points.append(
            TrialPoint(
                trial=trial.number,
                error=float(attrs["error"]),
                latency_us=latency_us,
                macs=int(attrs.get("macs", 0)),
                params=int(attrs.get("params", 0)),
                reward=attrs.get("reward"),
                feasible=all(v <= 0 for v in constraints.values()),
                plan=attrs.get("plan", {}),
                signature=signature,
                artifact_sha256=str(attrs.get("artifact_sha256", "")),
                ratio=ratios,
                ratio_interval=intervals,
                confirmed=confirmed,
                first_session=first,
                stage_s=dict(attrs.get("stage_s", {})),
            )
        )
    return points


def _constraints_on_shown_figures(constraints: dict[str, float], record: SearchRecord,
                                  ratios: dict[str, float], latency_us: dict[str, float]) -> None:
    # A latency budget is judged on the figure shown (confirmed where confirmed), not only on the
    # first session the sampler saw.
    limits = record.config.get("constraints", {})
    primary = record.config["targets"][0]
    if primary not in ratios:
        return
    if limits.get("latency_budget_ratio") is not None:
        constraints["latency_budget_ratio"] = ratios[primary] - limits["latency_budget_ratio"]
    if limits.get("latency_budget_us") is not None:
        constraints["latency_budget_us"] = latency_us[primary] - limits["latency_budget_us"]


def summary(record: SearchRecord, study: optuna.Study) -> dict[str, Any]:
    """Counts by state, failures by stage, stage times, the best trial and the base figures."""
    states: dict[str, int] = {}
    failures: dict[str, dict[str, Any]] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
        if trial.state == TrialState.FAIL:
            stage = str(trial.user_attrs.get("fail_stage", "unknown"))
            entry = failures.setdefault(stage, {"count": 0, "first_trial": trial.number,
                                                "first_reason": trial.user_attrs.get("fail_reason", "")})
            entry["count"] += 1
    points = trial_points(study, record)
    feasible = [p for p in points if p.reward is not None and p.feasible]
    # The best trial by the reward on the figures shown (confirmed where confirmed): a trial that
    # led on a lucky first session must not be named best beside a front it is not on.
    scored = [(shown_reward(p, record), p) for p in feasible]
    best_reward, best = max(scored, key=lambda pair: pair[0]) if scored else (None, None)
    stage_times: dict[str, list[float]] = {}
    for point in points:
        for stage, seconds in point.stage_s.items():
            stage_times.setdefault(stage, []).append(seconds)
    for (target, _signature), verdict in confirmation.stored(study.user_attrs).items():
        stage_times.setdefault(f"confirm:{target}", []).append(verdict.elapsed_s)
    confirmed = sum(all(p.confirmed.values()) for p in points if p.confirmed)
    return {
        "name": record.name,
        "targets": record.config["targets"],
        "objective": record.config["objective"],
        "sampler": record.config["sampler"],
        "trials_asked": record.config["trials"],
        "trials": states,
        "completed": states.get("COMPLETE", 0),
        "infeasible": sum(not p.feasible for p in points),
        "failures_by_stage": failures,
        "stage_median_s": {stage: statistics.median(values) for stage, values in sorted(stage_times.items())},
        "best_reward": best_reward,
        "best_trial": best.trial if best is not None else None,
        "best_is_base": best is not None and best.signature == record.base["signature"],
        "error_floor": error_floor_of(record),
        "confirmed_trials": confirmed,
        "base_error": record.base["error"],
        "base_latency_us": base_latency_us(record, study),
        "created_at": record.created_at.isoformat(),
    }


def shown_reward(point: TrialPoint, record: SearchRecord) -> float:
    """The reward of ``point`` on the primary target's figure as shown (confirmed where confirmed)."""
    config = SearchConfig.model_validate(record.config)
    latency = point.latency_us[config.targets[0]]
    return reward(point.error, latency, error_floor=error_floor_of(record),
                  resource_constrained=config.constraints.has_latency_budget)


def best_is_base_warning(info: dict[str, Any], config: SearchConfig) -> str | None:
    """A warning when the search's best trial is the dense base model, naming the flags to change."""
    if not info["best_is_base"] or config.objective != "reward" or info["completed"] < 2:
        return None
    return (
        f"the best trial is the dense base model (error {info['base_error']:.4g}): no pruned plan scored a "
        f"higher reward with error floor {info['error_floor']:.4g}. Raise --error-floor to accept more error "
        "for speed, give --latency-budget-ratio R (AMC's resource-constrained mode: the most accurate plan "
        "within R x the base latency wins), or use --objective pareto to see the whole trade-off"
    )


def replace_budget(config: SearchConfig, *, trials: int | None, timeout_s: float | None,
                   max_consecutive_failures: int | None = None) -> SearchConfig:
    data = config.model_dump()
    if max_consecutive_failures is not None:
        data["max_consecutive_failures"] = max_consecutive_failures
    if trials is not None:
        data["trials"] = trials
    if timeout_s is not None:
        data["timeout_s"] = timeout_s
    return SearchConfig.model_validate(data)


def pareto_rows(record: SearchRecord, study: optuna.Study, target: str) -> list[dict[str, Any]]:
    """The Pareto front on ``target`` as rows with speedups and accuracy change against the base.

    Latencies are confirmed figures where the trial was confirmed (``confirmed`` says which),
    times the base model's latency as last measured; ``speedup_interval`` is the range a
    re-measurement is expected in.
    """
    if target not in record.config["targets"]:
        raise ConfigError(f"target {target!r} is not one of this search's: {', '.join(record.config['targets'])}")
    base = record.base
    base_latency = base_latency_us(record, study)
    rows = []
    points = trial_points(study, record)
    # The front of confirmed figures, plus the unconfirmed trials that the mixed front would hold,
    # marked: an unconfirmed (possibly lucky) figure never hides a confirmed trial.
    shown = {p.trial: p for p in pareto_front([p for p in points if p.confirmed.get(target)], target)}
    shown.update({p.trial: p for p in pareto_front(points, target) if not p.confirmed.get(target)})
    for point in sorted(shown.values(), key=lambda p: (p.latency_us[target], p.error)):
        rows.append({
            "trial": point.trial,
            "error": point.error,
            "accuracy": point.accuracy,
            "accuracy_change": (base["error"] - point.error),
            "latency_us": dict(point.latency_us),
            "base_latency_us": base_latency,
            "ratio": dict(point.ratio),
            "speedup": {k: base_latency[k] / v for k, v in point.latency_us.items() if v > 0},
            "speedup_interval": {k: [1 / high, 1 / low if low > 0 else None]
                                 for k, (low, high) in point.ratio_interval.items() if high > 0},
            "confirmed": dict(point.confirmed),
            "macs": point.macs,
            "params": point.params,
            "reward": point.reward,
        })
    return rows
