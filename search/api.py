"""The Python API: everything the ``hwprune`` command does, as functions.

The CLI is a thin layer over these (it adds tables, progress and exit codes). Heavy libraries are
imported inside the functions, so ``import search.api`` is cheap. ``search.load`` is
``load`` here. Example (the README runs it in ``tests/search_tests/test_api.py``)::

    import search.api as hw

    bundle = hw.load_model("digits")
    space = hw.build_space(bundle, ["cpu-ort-fp32"])
    pruned = hw.apply_plan(bundle, space, {"channels": {"stages.2.3.conv1": 64}})
    folder = hw.export_plan(bundle, {"channels": {"stages.2.3.conv1": 64}}, "out/half")
    model = hw.load("out/half")

Every function raises ``search.errors.SearchError`` (or ``hardware_profiles.ProfileError``,
``latency_models.LatencyError``) subclasses with a message naming the input and the fix.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.config import (
    DEFAULT_PROFILE,
    SearchConfig,
    artifacts_url,
    cache_dir,
    db_url,
    heartbeat_settings,
    load_search_config,
    profile_dirs,
    resolve_profile,
)
from search.errors import ConfigError, SearchError

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from hardware_profiles import HardwareProfile
    from latency_models import Measurement, PairedMeasurement
    from search.pipeline.bundle import ModelBundle
    from search.pipeline.chain import Chained
    from search.pipeline.plan import Plan
    from search.pipeline.pruning import PrunedModel
    from search.pipeline.space import SearchSpace
    from search.storage.artifacts import PruneReport
    from search.storage.record import TrialRecord
    from search.study.controller import Prepared
    from search.study.materialize import Rebuilt
    from search.study.orchestration import ConfirmedCallback, ProgressCallback, SearchResult
    from search.study.pareto import TrialPoint
    from search.study.read import ParetoRow, SearchSummary, TrialRow
    from search.study.runtime import Runtime
    from search.study.sensitivity import Sensitivity

__all__ = [
    "Settings",
    "apply_plan",
    "build_space",
    "confirm",
    "export_plan",
    "export_trials",
    "load",
    "list_searches",
    "load_model",
    "measure",
    "pareto",
    "plan_template",
    "prune_artifacts",
    "report",
    "resume_search",
    "run_search",
    "run_worker",
    "sensitivity_scan",
    "status",
    "trials",
]



@dataclass(frozen=True)
class Settings:
    """Where things live; every field defaults as the CLI's does (flag, then environment).

    Attributes:
        db: SQLAlchemy URL; default ``$HWPRUNE_DB`` or ``sqlite:///hwprune.db``.
        profiles_dirs: folders of extra hardware profiles; default ``$HWPRUNE_PROFILES``.
        cache: where trained examples and artifacts are cached; default ``$HWPRUNE_CACHE``.
    """

    db: str | None = None
    profiles_dirs: Sequence[Path] = field(default_factory=tuple)
    cache: Path | None = None

    @property
    def db_url(self) -> str:
        return db_url(self.db)

    @property
    def profile_dirs(self) -> list[Path]:
        return profile_dirs(list(self.profiles_dirs) or None)

    @property
    def cache_dir(self) -> Path:
        return self.cache if self.cache is not None else cache_dir()

    def runtime(self, *, worker_index: int = 0, wait_for_agents: bool = False, device: str | None = None) -> Runtime:
        from search.study.runtime import Runtime

        heartbeat, grace = heartbeat_settings()
        # The environment is read here, where settings are made, and nowhere below.
        return Runtime(db_url=self.db_url, profile_dirs=tuple(self.profile_dirs), cache_dir=self.cache_dir,
                       heartbeat_s=heartbeat, grace_s=grace, worker_index=worker_index,
                       wait_for_agents=wait_for_agents, artifacts_url=artifacts_url(self.db_url), device=device)


DEFAULT = Settings()


# --- one model ---------------------------------------------------------------------------------


def load_model(spec: str, *, settings: Settings = DEFAULT) -> ModelBundle:
    """The model bundle of a built-in example (``digits``) or a plugin ``package.module:function``."""
    from search.examples import load_bundle

    return load_bundle(spec, cache_dir=settings.cache_dir)


def _bundle(model: str | ModelBundle, settings: Settings) -> ModelBundle:
    return load_model(model, settings=settings) if isinstance(model, str) else model


def profiles(names: Sequence[Any] | None, *, settings: Settings = DEFAULT) -> list[HardwareProfile]:
    """Hardware profiles by name (profile objects pass through); default ``cpu-ort-fp32``."""
    from hardware_profiles import HardwareProfile

    return [p if isinstance(p, HardwareProfile) else resolve_profile(str(p), settings.profile_dirs)
            for p in (names or [DEFAULT_PROFILE])]


def build_space(
    model: str | ModelBundle,
    targets: Sequence[Any] | None = None,
    *,
    ignored: Sequence[str] = (),
    keep_ratios: Sequence[float] | None = None,
    settings: Settings = DEFAULT,
) -> SearchSpace:
    """The pruning space of ``model`` (a spec or a bundle) for ``targets`` (profile names)."""
    from search.config import DEFAULT_KEEP_RATIOS
    from search.pipeline.space import build_space as build

    bundle = _bundle(model, settings)
    return build(bundle.model, bundle.example_input, profiles(targets, settings=settings),
                 keep_ratios=keep_ratios or DEFAULT_KEEP_RATIOS, ignored=ignored)


def _plan(plan: Plan | Mapping[str, Any] | str | Path) -> Plan:
    from search.pipeline.plan import Plan

    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str | Path):
        return Plan.load(Path(plan))
    return Plan.from_dict(dict(plan))


def plan_template(space: SearchSpace) -> str:
    """A plan file with every group and N:M layer of ``space`` and its options as comments."""
    return space.template("hwprune plan")


@dataclass(frozen=True)
class Materialized:
    """A plan applied and recovered: the pruned model and its figures."""

    pruned: PrunedModel
    plan: Plan
    error: float
    recovery: list[dict[str, Any]]

    @property
    def model(self) -> nn.Module:
        return self.pruned.model


def apply_plan(
    bundle: ModelBundle,
    space: SearchSpace,
    plan: Plan | Mapping[str, Any] | str | Path,
    *,
    importance: str = "magnitude",
    nm_criterion: str = "magnitude",
    finetune_steps: int = 0,
    compensation: str = "none",
) -> Materialized:
    """Apply ``plan`` (a ``Plan``, a mapping as in a plan file, or a file path) to a copy of the
    base model, recover it as a search's trial would (adaptive BN, ``finetune_steps`` of
    fine-tuning, the better on held-out data) and score it on the validation data.
    ``compensation`` "mean" puts removed channels' average output back into their consumers."""
    done = _chain(bundle, space, plan, importance=importance, nm_criterion=nm_criterion,
                  finetune_steps=finetune_steps, out=None, compensation=compensation)
    if done.pruned is None or done.plan is None or done.error is None:
        raise SearchError("the trial chain returned no pruned model or error for a plan")  # it always does
    return Materialized(done.pruned, done.plan, done.error, [dict(p) for p in done.recovery])


def _chain(bundle: ModelBundle, space: SearchSpace, plan: Plan | Mapping[str, Any] | str | Path, *,
           importance: str, nm_criterion: str, finetune_steps: int, out: Path | None, batch_size: int = 1,
           dynamo: bool = False, device: str = "cpu", compensation: str = "none") -> Chained:
    from search.config import RecoverySettings
    from search.pipeline.chain import ChainSettings, run_chain
    from search.pipeline.device import resolve_device

    settings = ChainSettings(importance=importance, nm_criterion=nm_criterion,
                             recovery=RecoverySettings(steps=finetune_steps), batch_size=batch_size, dynamo=dynamo,
                             dynamic_check=out is not None, device=resolve_device(device),
                             compensation=compensation)
    return run_chain(bundle, space, space.resolve(_plan(plan)), settings, out=out)


def export_plan(
    model: str | ModelBundle,
    plan: Plan | Mapping[str, Any] | str | Path,
    out: str | Path,
    *,
    targets: Sequence[Any] | None = None,
    ignored: Sequence[str] = (),
    importance: str = "magnitude",
    finetune_steps: int = 0,
    force: bool = False,
    dynamo: bool = False,
    device: str = "cpu",
    compensation: str = "none",
    settings: Settings = DEFAULT,
) -> dict[str, Any]:
    """Materialise ``plan`` on ``model`` and write the folder ``out`` (ONNX, weights, a
    self-contained ``model.pt2``, the plan, a manifest). Returns the manifest. ``device`` is
    where the recovery's ``finetune_steps`` run (``auto``, ``cpu``, ``cuda:N``, ``mps``).

    Give ``model`` as a spec (``digits``, ``package.module:function``) for ``load(out)`` to
    find the base model by itself; a bundle object records no spec, and ``load`` then needs it.

    Raises:
        ConfigError: ``out`` is not empty and ``force`` is false, or cannot be written.
    """
    from search.study.materialize import read_manifest, write_model_dir

    folder = Path(out)
    check_output_folder(folder, force=force)
    spec = model if isinstance(model, str) else None
    loaded = _bundle(model, settings)
    chosen_profiles = profiles(targets, settings=settings)
    space = build_space(loaded, chosen_profiles, ignored=ignored, settings=settings)
    with tempfile.TemporaryDirectory() as tmp:
        done = _chain(loaded, space, plan, importance=importance, nm_criterion="magnitude",
                      finetune_steps=finetune_steps, out=Path(tmp), batch_size=chosen_profiles[0].batch_size,
                      dynamo=dynamo, device=device, compensation=compensation)
        if done.pruned is None or done.plan is None or done.artifact is None:
            raise SearchError("the trial chain exported no pruned model for a plan")  # it always does
        write_model_dir(folder, bundle=loaded, plan=done.plan, pruned=done.pruned, artifact=done.artifact,
                        importance=importance, model_spec=spec, ignored_layers=list(ignored),
                        extra={"error": done.error, "finetune_steps": finetune_steps,
                               "recovery": list(done.recovery), "targets": [p.name for p in chosen_profiles],
                               "base_macs": space.base_macs, "compensation": compensation})
    return read_manifest(folder)


def check_output_folder(out: Path, *, force: bool) -> None:
    """Refuse an output folder that holds files unless ``force``: an export never mixes with
    what was there (nothing is deleted either way; with ``force`` files of the same name are
    replaced)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder (it is created if missing)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {str(out)!r} is not empty; give an empty or new folder, or --force "
                          "to write into it")


def load(folder: str | Path, *, bundle: ModelBundle | None = None, settings: Settings = DEFAULT) -> nn.Module:
    """The pruned ``nn.Module`` of an exported folder, in eval mode.

    The base model comes from the plugin spec recorded in the manifest (or ``bundle``); it is
    pruned to the recorded channel counts and the stored weights are loaded. A base model that
    changed since the export is a ``ConfigError`` naming both fingerprints. Without hwprune, load
    ``model.pt2`` instead: ``torch.export.load(folder + "/model.pt2").module()``.
    """
    from search.study.materialize import load_model_dir

    return load_model_dir(Path(folder), cache_dir=settings.cache_dir, bundle=bundle)


def measure(
    onnx_path: str | Path, profile: Any = DEFAULT_PROFILE, *, vs: str | Path | None = None,
    settings: Settings = DEFAULT,
) -> Measurement | PairedMeasurement:
    """Time an ONNX model on a local profile; with ``vs``, paired with that reference model."""
    from latency_models import registry

    chosen = profiles([profile], settings=settings)[0]
    if chosen.location == "remote":
        raise ConfigError(f"profile {chosen.name!r} is measured on a remote device; pick a local profile "
                          "(hwprune profiles list)")
    with registry.get(chosen.backend)(chosen) as backend:
        if vs is None:
            return backend.measure(Path(onnx_path))
        return backend.measure_paired(Path(onnx_path), Path(vs))


# --- searches ----------------------------------------------------------------------------------


def search_config(config: SearchConfig | Mapping[str, Any] | str | Path | None = None,
                  **overrides: Any) -> SearchConfig:
    """A validated search configuration from a mapping, a YAML file and/or keyword overrides."""
    if isinstance(config, SearchConfig):
        return SearchConfig.model_validate(config.model_dump() | {k: v for k, v in overrides.items()
                                                                   if v is not None})
    if isinstance(config, str | Path):
        return load_search_config(Path(config), overrides)
    return load_search_config(None, {**dict(config or {}), **overrides})


def run_search(
    config: SearchConfig | Mapping[str, Any] | str | Path,
    *,
    workers: int = 1,
    confirm: bool = True,
    on_trial: ProgressCallback | None = None,
    on_confirmed: ConfirmedCallback | None = None,
    settings: Settings = DEFAULT,
    wait_for_agents: bool = False,
    debug: bool = False,
) -> SearchResult:
    """Start a search (or resume one of that name with a compatible config) and run it as
    ``hwprune search start`` does: its trials (in ``workers`` processes), the confirmation of its
    front, the final recovery (``final_steps``), and what a user is told at the end.

    ``on_trial(SearchProgress)`` is called after each trial, ``on_confirmed(trial, target,
    Confirmation)`` after each confirmation. ``debug`` passes ``--debug`` on to worker processes.
    Returns the search's summary, its primary front and the end-of-search warnings.
    """
    chosen = search_config(config)
    # The config's device reaches this process and the workers it starts alike.
    runtime = settings.runtime(wait_for_agents=wait_for_agents, device=chosen.device)
    prepared = _prepare(chosen, runtime)
    return _run(prepared, runtime, workers=workers, confirm=confirm, on_trial=on_trial,
                on_confirmed=on_confirmed, debug=debug)


def resume_search(
    name: str,
    *,
    trials: int | None = None,
    timeout_s: float | None = None,
    max_consecutive_failures: int | None = None,
    workers: int = 1,
    on_trial: ProgressCallback | None = None,
    on_confirmed: ConfirmedCallback | None = None,
    settings: Settings = DEFAULT,
    wait_for_agents: bool = False,
    debug: bool = False,
    device: str | None = None,
) -> SearchResult:
    """Resume a stored search with its stored configuration and a new budget, as ``run_search``;
    ``device`` runs this resumption's model work elsewhere than the stored config says (each
    trial records where it ran)."""
    from search.storage.repository import require_database
    from search.study.controller import replace_budget
    from search.study.runtime import find_record

    runtime = settings.runtime(wait_for_agents=wait_for_agents, device=device)
    require_database(runtime.db_url)
    stored = find_record(name, runtime).config
    config = replace_budget(stored, trials=trials, timeout_s=timeout_s,
                            max_consecutive_failures=max_consecutive_failures)
    return _run(_prepare(config, runtime), runtime, workers=workers, confirm=True, on_trial=on_trial,
                on_confirmed=on_confirmed, debug=debug)


def run_worker(name: str, *, worker_index: int = 0, device: str | None = None, settings: Settings = DEFAULT) -> None:
    """Join a stored search as one more worker until its budget is met (``hwprune search worker``);
    ``device`` is this worker's device for model work (default: the search's)."""
    from search.storage.repository import require_database
    from search.study.controller import run_worker as run
    from search.study.orchestration import quiet_optuna

    runtime = settings.runtime(worker_index=worker_index, device=device)
    require_database(runtime.db_url)
    quiet_optuna()
    run(name, runtime)


def confirm(name: str, *, on_confirmed: ConfirmedCallback | None = None, settings: Settings = DEFAULT) -> SearchResult:
    """Measure a stored search's unconfirmed front trials again (a search does this when it ends)."""
    from search import progress
    from search.study.controller import confirm_front, load_prepared
    from search.study.orchestration import finish, quiet_optuna

    runtime = settings.runtime()
    quiet_optuna()
    prepared = load_prepared(name, runtime)
    with progress.task("confirming the Pareto front's latencies"):
        confirm_front(prepared, runtime, on_confirmed=on_confirmed)
    return finish(prepared, runtime)


def _prepare(config: SearchConfig, runtime: Runtime) -> Prepared:
    from search.study.controller import prepare as prepare_search
    from search.study.orchestration import quiet_optuna

    quiet_optuna()
    return prepare_search(config, runtime)


def _run(prepared: Prepared, runtime: Runtime, **options: Any) -> SearchResult:
    from search.study.orchestration import run_prepared

    return run_prepared(prepared, runtime, **options)


def list_searches(*, settings: Settings = DEFAULT) -> list[SearchSummary]:
    """The summary of every search in the database (``hwprune search list``)."""
    from search.storage.repository import require_database
    from search.study.orchestration import quiet_optuna
    from search.study.read import summary
    from search.study.runtime import load_study, optuna_storage

    runtime = settings.runtime()
    require_database(runtime.db_url)
    repo = runtime.repository()
    try:
        records = repo.list_searches()
    finally:
        repo.close()
    quiet_optuna()
    storage = optuna_storage(runtime)  # one connection for every search listed
    return [summary(r, load_study(r, runtime, storage=storage)) for r in records]


def prune_artifacts(*, min_age_s: float = 600.0, settings: Settings = DEFAULT) -> PruneReport:
    """Remove ONNX artifacts that no queued job, base model or Pareto front needs."""
    from search.storage.repository import require_database
    from search.study.retention import prune_artifacts as prune

    runtime = settings.runtime()
    require_database(runtime.db_url)
    return prune(runtime, min_age_s=min_age_s)


def _study(name: str, settings: Settings) -> tuple[Any, optuna.Study]:
    from search.storage.repository import require_database
    from search.study.orchestration import quiet_optuna
    from search.study.runtime import find_record, load_study

    runtime = settings.runtime()
    require_database(runtime.db_url)
    record = find_record(name, runtime)
    quiet_optuna()
    return record, load_study(record, runtime)


def status(name: str, *, settings: Settings = DEFAULT) -> SearchSummary:
    """A stored search's summary: trials by state, feasibility, failures, best trial, base figures
    (``.to_dict()`` is what ``hwprune search status --json`` prints)."""
    from search.study.read import summary

    record, study = _study(name, settings)
    return summary(record, study)


def trials(name: str, *, settings: Settings = DEFAULT) -> list[TrialRow]:
    """Every trial of a stored search (see ``search.study.read.trial_rows``; ``.to_dict()`` is a
    row of ``hwprune search trials --json``)."""
    from search.study.read import trial_rows

    record, study = _study(name, settings)
    return trial_rows(record, study)


def pareto(name: str, *, target: str | None = None, settings: Settings = DEFAULT) -> list[ParetoRow]:
    """The Pareto front of a stored search on ``target`` (default: its primary target)."""
    from search.study.read import check_target, pareto_rows

    record, study = _study(name, settings)
    return pareto_rows(record, study, check_target(record, target))


def sensitivity_scan(name: str, *, settings: Settings = DEFAULT) -> Sensitivity | None:
    """The sensitivity scan a stored search made (``--sensitivity-start`` or ``netadapt``), if any."""
    from search.study.sensitivity import stored

    return stored(_study(name, settings)[1])


def export_trials(
    name: str,
    out: str | Path,
    *,
    trial: int | None = None,
    front: bool = False,
    finetune_steps: int = 0,
    force: bool = False,
    on_trial: Callable[[int, Path], None] | None = None,
    on_confirmed: Callable[[int, str, Any], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    device: str | None = None,
    settings: Settings = DEFAULT,
) -> list[dict[str, Any]]:
    """Rebuild stored trials (``trial`` K, or the whole Pareto ``front``) bit-identically and
    write each to a folder; returns their manifests (with ``folder``). ``on_total(n)`` is called
    once the trials to export are known, ``on_trial(number, folder)`` after each is written.
    Each trial is rebuilt on the kind of device it was recovered on (``device`` picks which one;
    another kind is refused, since its weights would differ).

    Raises:
        ConfigError: neither or both of ``trial`` and ``front``; no such completed trial; a
            non-empty ``out`` without ``force``.
        SearchError: the rebuilt model's ONNX differs from the measured one.
    """
    from search.pipeline.device import replay_device
    from search.storage.record import read_trials
    from search.storage.repository import require_database
    from search.study.controller import confirm_front, load_prepared
    from search.study.materialize import read_manifest, rebuild_trial, write_model_dir
    from search.study.orchestration import quiet_optuna
    from search.study.read import base_latency_us, pareto_rows, trial_points
    from search.study.runtime import load_study

    if (trial is None) == (not front):
        raise ConfigError("give exactly one of --trial K or --pareto")
    folder_root = Path(out)
    check_output_folder(folder_root, force=force)
    runtime = settings.runtime()
    require_database(runtime.db_url)
    quiet_optuna()
    prepared = load_prepared(name, runtime)
    record, config = prepared.record, prepared.config
    study = load_study(record, runtime)
    by_number = {t.number: t for t in read_trials(study)}
    if trial is not None:
        if trial not in by_number or not by_number[trial].has_figures:
            done = sorted(n for n, t in by_number.items() if t.has_figures)
            raise ConfigError(f"search {name!r} has no completed trial {trial}; completed: {done}")
        numbers = [trial]
    else:
        confirm_front(prepared, runtime, on_confirmed=on_confirmed)  # the front is exported with confirmed figures only
        numbers = [row.trial for row in pareto_rows(record, study, config.targets[0])]
    if on_total is not None:
        on_total(len(numbers))
    base_latency = base_latency_us(record, study)
    points = {p.trial: p for p in trial_points(study, record)}
    # Export recovers as long as the search's final recovery did (--final-steps), unless told otherwise.
    finetune_steps = finetune_steps or config.final_steps
    manifests = []
    with tempfile.TemporaryDirectory() as tmp:
        for number in numbers:
            stored = by_number[number]
            rebuilt = rebuild_trial(
                bundle=prepared.bundle, space=prepared.space, config=config, plan=stored.plan or {},
                artifact_sha256=stored.artifact_sha256, base_signature=record.base.signature, artifact_dir=Path(tmp),
                batch_size=prepared.profiles[0].batch_size, finetune_steps=finetune_steps,
                device=replay_device(stored.model_device, device, trial=number),
            )
            folder = folder_root / f"trial-{number}" if front else folder_root
            write_model_dir(folder, bundle=prepared.bundle, plan=rebuilt.plan, pruned=rebuilt.pruned,
                            artifact=rebuilt.artifact, importance=config.importance,
                            nm_criterion=config.nm_criterion, model_spec=config.model_spec,
                            ignored_layers=config.ignored_layers,
                            extra=_trial_manifest(name, config, points[number], stored, rebuilt, base_latency,
                                                  finetune_steps))
            manifests.append(read_manifest(folder) | {"folder": str(folder)})
            if on_trial is not None:
                on_trial(number, folder)
    return manifests


def _trial_manifest(name: str, config: SearchConfig, point: TrialPoint, stored: TrialRecord, rebuilt: Rebuilt,
                    base_latency: Mapping[str, float], finetune_steps: int) -> dict[str, Any]:
    """What an exported trial's manifest says beside its model: the search's figures for it."""
    return {
        "search": name, "trial": point.trial, "error": point.error,
        "accuracy": point.accuracy, "latency_us": dict(point.latency_us),
        "speedup": {k: base_latency[k] / v for k, v in point.latency_us.items()},
        "latency_ratio_interval": {k: list(v) for k, v in point.ratio_interval.items()},
        "latency_confirmed": dict(point.confirmed),
        "reward": stored.reward,
        "finetune_steps": rebuilt.finetune_steps,
        "extra_finetune_steps": finetune_steps,
        "recovery": rebuilt.recovery,
        "targets": list(config.targets),
        "compensation": config.compensation,
        # With trial pruning the file measured held the weights before recovery.
        "measured_onnx_sha256": stored.measured_sha256,
        "error_after_extra_finetune": rebuilt.error,
        # Multi-fidelity: the search-time error beside the final one.
        "search_error": point.error,
        **({"final_error": rebuilt.error, "final_accuracy": 1.0 - rebuilt.error,
            "final_steps": finetune_steps} if rebuilt.error is not None else {}),
    }


def report(name: str, out: str | Path, *, force: bool = False, settings: Settings = DEFAULT) -> dict[str, Any]:
    """Write ``out/index.html`` with PNG plots of a stored search (see ``search.study.report``);
    returns what each plot draws."""
    from search.study.report import write_report

    folder = Path(out)
    check_output_folder(folder, force=force)
    record, study = _study(name, settings)
    return write_report(record, study, folder)
