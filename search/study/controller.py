"""Create or resume a search, run its trials and confirm its front (reading it back: ``read``).

Optuna's RDB storage holds the study and every trial (plans are trial params, figures are user
attributes); hwprune's tables hold the search definition, artifacts and the latency cache. The
heartbeat makes a trial whose process died (SIGKILL, power loss) FAIL after the grace period and
enqueues a retry with the same plan.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import optuna

import search.progress as progress
from hardware_profiles import HardwareProfile
from latency_models import (
    BaseArtifact,
    DeviceLock,
    Measurement,
    Meter,
    file_sha256,
    make_meter,
    measurement_device,
    registry,
)
from search.config import SearchConfig, incompatibilities, keep_stored_threads, resolve_error_floor, resolve_profile
from search.errors import ConfigError, SearchError, StorageError
from search.examples import load_bundle
from search.pipeline.bundle import ModelBundle
from search.pipeline.chain import ChainSettings, run_chain
from search.pipeline.device import CPU, ModelDevice, replay_device, resolve_device
from search.pipeline.features import architecture_features
from search.pipeline.space import SearchSpace, build_space
from search.storage import Repository, SearchRecord
from search.storage import record as trial_record
from search.storage.models import utcnow
from search.storage.record import BaseFigures
from search.study import confirmation, netadapt, sensitivity
from search.study.confirmation import Confirmation
from search.study.materialize import rebuild_trial
from search.study.objective import KNOWN_ERRORS, SearchContext, run_trial
from search.study.pareto import TrialPoint, pareto_front
from search.study.read import error_floor_of, trial_points
from search.study.runtime import (
    Runtime,
    completed,
    counted,
    find_record,
    load_study,
    make_pruner,
    make_sampler,
    optuna_storage,
    package_versions,
    study_name,
)
from search.study.screening import Screening
from search.study.trial_loop import LoopLimits, TrialCallback, run_trials

logger = logging.getLogger(__name__)

@dataclass
class Prepared:
    """A search ready to run: its definition, model, space and base figures."""

    record: SearchRecord
    config: SearchConfig
    bundle: ModelBundle
    space: SearchSpace
    profiles: list[HardwareProfile]
    device: ModelDevice = CPU  # where this process's model work runs, with the machine's device lock


def _load_model_and_space(
    config: SearchConfig, runtime: Runtime
) -> tuple[ModelBundle, SearchSpace, list[HardwareProfile]]:
    profiles = [resolve_profile(name, runtime.profile_dirs) for name in config.targets]
    bundle = load_bundle(config.model_spec, cache_dir=runtime.cache_dir)
    space = build_space(bundle.model, bundle.example_input, profiles,
                        keep_ratios=config.keep_ratios, ignored=config.ignored_layers,
                        hidden_size=config.prune_hidden_size)
    return bundle, space, profiles


def prepare(config: SearchConfig, runtime: Runtime) -> Prepared:
    """Create the search, or check that it may resume with this config.

    Nothing is written before the config, profiles, model and space are known to be valid. A
    new search measures the base model (error and latency per target) and enqueues it as
    trial 0.

    Raises:
        ConfigError: the stored search differs in something other than its budget.
    """
    device = model_device(config, runtime)  # a missing GPU is refused before anything is written
    repo = runtime.repository()
    try:
        existing = repo.find_search(config.name)
        config = config.for_this_machine() if existing is None else keep_stored_threads(existing.config, config)
        if existing is not None:
            differences = incompatibilities(existing.config, config)
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
            record = _create(config, runtime, repo, bundle, space, profiles, device)
        return Prepared(record, config, bundle, space, profiles, device)
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
    for profile in profiles:
        if profile.location == "remote" and not repo.jobs.live_agents(profile.name, runtime.agent_live_s):
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
    device: ModelDevice,
) -> SearchRecord:
    with tempfile.TemporaryDirectory() as tmp:
        # The base model through the trial chain: nothing applied or recovered, scored, exported
        # (with the full export check, once per search: every trial runs the base's code).
        settings = ChainSettings.for_search(config, batch_size=profiles[0].batch_size, device=device,
                                            dynamic_check=True)
        chained = run_chain(bundle, None, None, settings, out=Path(tmp))
        artifact, base_error, signature = chained.artifact, chained.error, chained.signature
        if artifact is None or base_error is None:
            raise SearchError("the trial chain returned no ONNX file or error for the base model")  # out was given
        repo.put_artifact_file(artifact.path, artifact.sha256)
        base = BaseArtifact(artifact.path, artifact.sha256, signature)
        measurements = {}
        with progress.task("measuring the base model (trial 0's reference)", total=len(profiles)) as advance:
            for p in profiles:
                measurements[p.name] = _measure_base(p, repo, base, runtime).to_dict()
                advance(1)
    record = SearchRecord(
        name=config.name,
        study_name=study_name(config.name),
        config=config,
        base_fingerprint=bundle.fingerprint(),
        space_fingerprint=space.fingerprint(),
        space=space.to_dict(),
        base=BaseFigures(error=base_error, macs=space.base_macs, params=space.base_params, signature=signature,
                         artifact_sha256=artifact.sha256, measurements=measurements,
                         error_floor=resolve_error_floor(config, base_error), model_device=device.name,
                         # what the error measures, for the front's columns (ModelBundle.names)
                         error_name=bundle.names()[0], score_name=bundle.names()[1]),
        versions=package_versions(),
        created_at=utcnow(),
    )
    directions: list[optuna.study.StudyDirection] = (
        [optuna.study.StudyDirection.MAXIMIZE] if config.objective == "reward"
        else [optuna.study.StudyDirection.MINIMIZE] * (1 + len(profiles))
    )
    storage = optuna_storage(runtime, worker=True)
    study = optuna.create_study(study_name=record.study_name, storage=storage,
                                directions=directions, load_if_exists=True)
    if not study.trials:
        trial_record.enqueue(study, space.dense_params(), base=True)
    repo.add_search(record)
    logger.info("created search %s (%d groups, %d N:M layers)", config.name, len(space.groups), len(space.sparsity))
    return record


def _measure_base(profile: HardwareProfile, repo: Repository, base: BaseArtifact, runtime: Runtime) -> Measurement:
    """The base model alone on a target: the reference every trial's ratio multiplies."""
    with make_meter(profile, repo, base, lock=measurement_lock(profile, runtime)) as meter:
        return meter.measure_base()


def load_prepared(name: str, runtime: Runtime) -> Prepared:
    """A stored search with its model and space rebuilt and checked against what was stored."""
    record = find_record(name, runtime)
    config = record.config
    device = model_device(config, runtime)
    bundle, space, profiles = _load_model_and_space(config, runtime)
    _check_same_base(record, bundle, space)
    return Prepared(record, config, bundle, space, profiles, device)


def _base_artifact(prepared: Prepared, repo: Repository, runtime: Runtime) -> tuple[Path, Path]:
    """The artifact folder and the base model's ONNX file in it: from the artifact store, else
    exported again from the base model (checked against the stored sha256) and stored back, since
    remote agents fetch it through the hub."""
    record = prepared.record
    sha256 = record.base.artifact_sha256
    artifact_dir = runtime.cache_dir / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    base_path = artifact_dir / f"{sha256}.onnx"
    if base_path.exists() and file_sha256(base_path) == sha256:
        if not repo.artifacts.exists(sha256):
            repo.put_artifact_file(base_path, sha256)
        return artifact_dir, base_path
    if not repo.artifacts.fetch_to(sha256, base_path):
        with tempfile.TemporaryDirectory(dir=artifact_dir) as tmp:
            settings = ChainSettings.for_search(prepared.config, batch_size=prepared.profiles[0].batch_size)
            remade = run_chain(prepared.bundle, None, None, settings, out=Path(tmp), score=False).artifact
            if remade is None or remade.sha256 != sha256:
                raise StorageError(
                    f"the base model's ONNX of search {record.name!r} is not in the artifact store "
                    f"{repo.artifacts.url} and exporting it again gives {remade and remade.sha256[:12]}, not "
                    f"{sha256[:12]}: torch or onnx versions changed since the search began"
                )
            repo.put_artifact_file(remade.path, sha256)
            os.replace(remade.path, base_path)
    return artifact_dir, base_path


def _base_of(record: SearchRecord, base_path: Path) -> BaseArtifact:
    return BaseArtifact(base_path, record.base.artifact_sha256, record.base.signature)


def _open_meters(prepared: Prepared, repo: Repository, base_path: Path, stack: ExitStack,
                 runtime: Runtime) -> list[Meter]:
    """One meter per target (local or remote, as its profile says), entered on ``stack``."""
    record = prepared.record
    base = _base_of(record, base_path)
    return [stack.enter_context(make_meter(profile, repo, base, base_median_us=record.base.median_us(profile.name),
                                           lock=measurement_lock(profile, runtime)))
            for profile in prepared.profiles]


def _locks(runtime: Runtime) -> Path:
    # One folder per machine's cache: every worker and search using it shares the device locks.
    return runtime.cache_dir / "locks"


def model_device(config: SearchConfig, runtime: Runtime) -> ModelDevice:
    """The device ``config`` names for model work, with the machine's lock for it (``ConfigError``
    where it does not exist here)."""
    device = resolve_device(runtime.device or config.device)
    if device.note:
        logger.warning("%s", device.note)
    return device.with_lock(DeviceLock(_locks(runtime), device.name))


def measurement_lock(profile: HardwareProfile, runtime: Runtime) -> DeviceLock | None:
    """The lock a local target's measurements hold on its device (None for a remote target)."""
    device = measurement_device(profile)
    return None if device is None else DeviceLock(_locks(runtime), device)


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
                              sampler=make_sampler(config, runtime.worker_index), pruner=make_pruner(config))
    if config.trials is not None and counted(study) >= config.trials:
        return study
    repo = runtime.repository()
    with ExitStack() as stack:
        stack.callback(repo.close)
        artifact_dir, base_path = _base_artifact(prepared, repo, runtime)
        meters = _open_meters(prepared, repo, base_path, stack, runtime)
        # Each worker exports into a folder of its own, emptied as trials end: the artifact store
        # keeps what jobs and fronts need.
        scratch = Path(tempfile.mkdtemp(prefix="trials-", dir=artifact_dir))
        stack.callback(shutil.rmtree, scratch, True)
        ctx = SearchContext(
            config=config, bundle=prepared.bundle, space=prepared.space, meters=meters, repo=repo,
            artifact_dir=scratch, batch_size=prepared.profiles[0].batch_size,
            base_error=record.base.error, base_signature=record.base.signature,
            error_floor=error_floor_of(record),
            screening=_screening(prepared, meters, repo),
            device=prepared.device,
        )
        callbacks: list[TrialCallback] = [] if on_trial is None else [on_trial]
        limits = LoopLimits(trials=config.trials, timeout_s=config.timeout_s,
                            max_consecutive_failures=config.max_consecutive_failures)
        def objective(trial: optuna.Trial) -> float | list[float]:
            return run_trial(trial, ctx)

        scanned = None
        if config.sampler == "netadapt" or (config.sensitivity_start and runtime.worker_index == 0):
            scanned = sensitivity.prepare_start(study, ctx, enqueue=config.sampler != "netadapt")
        if config.sampler == "netadapt" and scanned is not None:
            netadapt.run(study, prepared.space, scanned, target=config.targets[0], budget=config.trials,
                         run_batch=lambda n: run_trials(study, storage, objective, replace(limits, trials=n),
                                                        callbacks=callbacks))
            logger.info("netadapt: %d trials completed", completed(study))
            return study
        result = run_trials(study, storage, objective, limits, callbacks=callbacks)
        logger.info("worker %d: %d trials completed, %d pruned, %d failed, %d finished by other workers",
                    runtime.worker_index, result.completed, result.pruned, result.failed, result.taken_over)
    return study


def _screening(prepared: Prepared, meters: list[Meter], repo: Repository) -> Screening | None:
    """The hybrid/predicted latency screen, and the budget-aware proposals' (None when neither)."""
    if prepared.config.latency == "measured" and prepared.config.screening.budget_band is None:
        return None
    bundle = prepared.bundle
    base = architecture_features(bundle.model, bundle.example_input)
    return Screening(prepared.config, meters, repo, base=base, base_fingerprint=prepared.record.base_fingerprint)


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
    repo = runtime.repository()
    sessions = 0
    failed: set[tuple[str, str]] = set()
    with ExitStack() as stack:
        stack.callback(repo.close)
        artifact_dir, base_path = _base_artifact(prepared, repo, runtime)
        base_now = trial_record.read_base_now(study)
        for profile in prepared.profiles:
            # Remote targets keep the base figure their agent measured when the search began.
            if profile.location == "local":
                base_now[profile.name] = _measure_base(profile, repo, _base_of(record, base_path), runtime).median_us
        trial_record.write_base_now(study, base_now)
        meters = {m.profile.name: m for m in _open_meters(prepared, repo, base_path, stack, runtime)}
        for _ in range(completed(study) * len(meters) + 1):  # each pass settles at least one
            todo = [(t, p) for t, p in _unconfirmed_front(record, study) if (t, p.signature) not in failed]
            if not todo:
                break
            for target, point in todo:
                try:
                    verdict = _confirm_one(meters[target], point, target, repo, artifact_dir, prepared)
                except KNOWN_ERRORS as exc:
                    failed.add((target, point.signature))
                    logger.warning("trial %d stays unconfirmed on %s: %s", point.trial, target, exc)
                    continue
                # A measured trial's first session is its own timing; a predicted trial's are all new.
                sessions += len(verdict.sessions) - (0 if point.predicted.get(target) else 1)
                trial_record.write_confirmation(study, target, point.signature, verdict)
                if on_confirmed is not None:
                    on_confirmed(point.trial, target, verdict)
    return sessions


def _confirm_one(meter: Meter, point: TrialPoint, target: str, repo: Repository,
                 artifact_dir: Path, prepared: Prepared) -> Confirmation:
    path = artifact_dir / f"{point.artifact_sha256}.onnx"
    if not path.exists() and not repo.artifacts.fetch_to(point.artifact_sha256, path):
        # Pruned from the store: re-made from the trial's plan; rebuild_trial checks the sha256.
        with tempfile.TemporaryDirectory(dir=artifact_dir) as tmp:
            remade = rebuild_trial(
                bundle=prepared.bundle, space=prepared.space, config=prepared.config,
                plan=point.plan, artifact_sha256=point.artifact_sha256,
                base_signature=prepared.record.base.signature, artifact_dir=Path(tmp),
                batch_size=prepared.profiles[0].batch_size,
                device=replay_device(point.model_device, None, trial=point.trial)).artifact
            repo.put_artifact_file(remade.path, point.artifact_sha256)  # a remote job needs it
            os.replace(remade.path, path)
    # A predicted latency is not a session: a predicted trial gets two (or three) measured ones.
    predicted = bool(point.predicted.get(target))
    found = [] if predicted else [point.first_session[target]]
    started = time.perf_counter()
    while confirmation.needs_another(found):
        measured = meter.confirm(path, point.artifact_sha256, point.signature,
                                 session=len(found) + predicted).result()
        found.append(confirmation.Session(measured.ratio, measured.ratio_ci))
    verdict = confirmation.conclude(found, elapsed_s=time.perf_counter() - started)
    logger.info("trial %d on %s: ratio %s -> %.4f", point.trial, target,
                " / ".join(f"{s.ratio:.4f}" for s in found), verdict.ratio)
    return verdict


def _unconfirmed_front(record: SearchRecord, study: optuna.Study) -> list[tuple[str, TrialPoint]]:
    """Unconfirmed architectures on any target's front (mixed figures), one trial each."""
    points = trial_points(study, record)
    todo: dict[tuple[str, str], TrialPoint] = {}
    for target in record.config.targets:
        for point in pareto_front(points, target):
            if not point.confirmed.get(target):
                todo.setdefault((target, point.signature), point)
    return [(target, point) for (target, _), point in todo.items()]


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


