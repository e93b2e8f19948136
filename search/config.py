"""Configuration: the one place where flags, environment and files are merged.

Nothing below the CLI and the service reads the environment; they call these helpers and pass the
results on as arguments.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hardware_profiles import HardwareProfile, load_profile
from hardware_profiles.loader import YamlInputError, describe_validation_error, read_yaml_file
from latency_models import registry
from search.errors import ConfigError

PROFILES_ENV = "HWPRUNE_PROFILES"
CACHE_ENV = "HWPRUNE_CACHE"


def profile_dirs(
    flag_dirs: Sequence[Path] | None, environ: Mapping[str, str] = os.environ
) -> list[Path]:
    """User profile folders: ``--profiles-dir`` flags win over ``HWPRUNE_PROFILES``.

    ``HWPRUNE_PROFILES`` holds one or more folders separated by the OS path separator.
    """
    if flag_dirs:
        return [Path(d) for d in flag_dirs]
    value = environ.get(PROFILES_ENV, "")
    return [Path(part) for part in value.split(os.pathsep) if part]


def resolve_profile(name: str, dirs: Sequence[Path]) -> HardwareProfile:
    """Load a profile and check that its backend is one hwprune knows.

    Raises:
        ProfileNotFoundError / InvalidProfileError: from the loader.
        ConfigError: the profile names an unknown backend.
    """
    profile = load_profile(name, dirs)
    check_backend(profile)
    return profile


def check_backend(profile: HardwareProfile) -> None:
    """Refuse a profile whose ``backend`` is not in the latency registry."""
    known = registry.names()
    if profile.backend not in known:
        raise ConfigError(
            f"profile {profile.name!r}: backend {profile.backend!r} is unknown; "
            f"known: {', '.join(known)}"
        )


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where trained examples and artifacts are cached: ``HWPRUNE_CACHE``, else the XDG cache."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hwprune"


PLUGIN_TIMEOUT_ENV = "HWPRUNE_PLUGIN_TIMEOUT_S"
# Long enough for a plugin that downloads pretrained weights; a plugin that hangs is stopped.
DEFAULT_PLUGIN_TIMEOUT_S = 900.0


def plugin_timeout_s(environ: Mapping[str, str] = os.environ) -> float:
    """How long a model plugin may take to import and build its bundle: ``HWPRUNE_PLUGIN_TIMEOUT_S``
    (seconds), else ``DEFAULT_PLUGIN_TIMEOUT_S``.

    Raises:
        ConfigError: not a positive number of seconds.
    """
    value = environ.get(PLUGIN_TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_PLUGIN_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{PLUGIN_TIMEOUT_ENV}={value!r}: give a positive number of seconds, e.g. 900")
    return seconds


# --- search configuration ---------------------------------------------------------------------

DB_ENV = "HWPRUNE_DB"
# The target of a search, a measurement or a space when none is named.
DEFAULT_PROFILE = "cpu-ort-fp32"
# The share of each group's channels a plan may keep, unless a search names its own grid.
DEFAULT_KEEP_RATIOS: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
DEFAULT_DB = "sqlite:///hwprune.db"


def db_url(flag: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """``--db`` wins over ``HWPRUNE_DB``; the default is ``hwprune.db`` in the working folder."""
    return flag or environ.get(DB_ENV) or DEFAULT_DB


ARTIFACTS_ENV = "HWPRUNE_ARTIFACTS"


def artifacts_url(database: str, environ: Mapping[str, str] = os.environ) -> str:
    """Where the ONNX artifacts of ``database`` live: ``HWPRUNE_ARTIFACTS`` (a folder or an fsspec
    URL such as ``s3://bucket/prefix``), else a folder beside a SQLite file (``hwprune.db`` ->
    ``hwprune.artifacts``), else a folder per database under the cache (named by a hash of its URL
    without the password): workers on several machines need a shared ``HWPRUNE_ARTIFACTS``."""
    import hashlib

    from sqlalchemy.engine import make_url

    if environ.get(ARTIFACTS_ENV):
        return environ[ARTIFACTS_ENV]
    try:
        parsed = make_url(database)
    except Exception:  # a malformed URL is refused where the database is opened
        return str(cache_dir(environ) / "artifacts" / hashlib.sha256(database.encode()).hexdigest()[:16])
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(str(parsed.database))
        return str(path.resolve().parent / f"{path.stem}.artifacts")
    safe = parsed.render_as_string(hide_password=True)
    return str(cache_dir(environ) / "artifacts" / hashlib.sha256(safe.encode()).hexdigest()[:16])


# The devices model work can run on (search.pipeline.device resolves them).
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d{1,3})?)$"


def cpu_count() -> int:
    """The cores this process may run on (its affinity, which a container or taskset limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


class _Section(BaseModel):
    # Strict: a YAML `trials: true` is not one trial, nor `seed: "3"` a number; and every number
    # finite (an `inf` budget would be stored as JSON's non-standard `Infinity`).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ConstraintsConfig(_Section):
    """Feasibility limits, given to Optuna as constraints (not folded into the reward)."""

    latency_budget_us: Annotated[float, Field(gt=0)] | None = None
    latency_budget_ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    error_ceiling: Annotated[float, Field(gt=0, le=1)] | None = None

    @property
    def has_latency_budget(self) -> bool:
        """A latency budget turns the reward into AMC's resource-constrained mode."""
        return self.latency_budget_us is not None or self.latency_budget_ratio is not None


LEGACY_RECOVERY_LR = 0.01  # recovery version 1's default learning rate (SGD)


class RecoverySettings(_Section):
    """Recovery after pruning, per trial (see ``search.pipeline.recovery``): adaptive batch-norm on
    ``bn_batches`` training batches, ``steps`` of fine-tuning, and the better of the models before
    and after, judged on ``holdout_batches`` held-out training batches. ``distill`` weighs the KL
    divergence to the dense model's outputs in the loss. ``batchnorm: frozen`` fine-tunes with every
    BatchNorm normalising by its running statistics and leaving them as they are (a pretrained
    network fine-tuned on a few batches of little data; see ``PRETRAINED_RECOVERY``); ``threads`` is fixed
    so that replays are bit-identical. The one recovery settings type: the search's trials, its
    final recovery, an export and ``search.api.apply_plan`` all take it (with a seed).

    ``version`` 2 is that recovery. Version 1 is hwprune's first (SGD with momentum at a constant
    ``lr``, the loader's own batch order, no adaptive batch-norm, nothing held out): searches stored
    before version 2 existed keep it, so that they resume and re-materialise as they were scored
    (see ``SearchConfig.from_stored``); the fields version 1 has no use for are ignored."""

    steps: Annotated[int, Field(ge=0, le=1_000_000)] = 30
    lr: Annotated[float, Field(gt=0, le=10)] = 3e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    warmup: Annotated[float, Field(ge=0, lt=1)] = 0.25
    distill: Annotated[float, Field(ge=0, le=1)] = 0.0
    bn_batches: Annotated[int, Field(ge=0, le=10_000)] = 2
    holdout_batches: Annotated[int, Field(ge=0, le=10_000)] = 2
    batchnorm: Literal["train", "frozen"] = "train"
    # None: the cores this process is given, fixed when the search is created and stored, so that
    # a replay on any machine uses the same count (float reductions split by it).
    threads: Annotated[int, Field(ge=1, le=256)] | None = None
    version: Literal[1, 2] = 2


class ScreeningSettings(_Section):
    """When ``latency`` is ``hybrid`` or ``predicted`` (see ``search.study.screening``): a target's
    latency is predicted only after ``min_measured`` measured trials, while the predictor's
    held-out mean error is at most ``max_mape`` and (hybrid) the candidate's 90% interval is
    within +-``max_rel_halfwidth`` of its prediction. A hybrid trial is measured when it could
    enter the front: judged on its prediction lowered by ``front_margin`` times the held-out mean
    error (None: on the low end of its 90% interval, the stricter rule)."""

    min_measured: Annotated[int, Field(ge=2, le=100_000)] = 12
    max_mape: Annotated[float, Field(gt=0, le=1)] = 0.03
    max_rel_halfwidth: Annotated[float, Field(gt=0, le=10)] = 0.10
    front_margin: Annotated[float, Field(ge=0, le=100)] | None = 1.0
    # With a latency budget: plans predicted wholly outside [budget * (1 - band), budget * (1 + band)]
    # are neither recovered nor measured (search.study.screening, "Budget-aware proposals"). None: off.
    budget_band: Annotated[float, Field(gt=0, lt=1)] | None = None


class SearchConfig(_Section):
    """Everything that defines a search. Merged once: defaults < YAML file < flags.

    ``trials`` and ``timeout_s`` may change when a search resumes; every other field must match
    the stored configuration (see ``incompatibilities``).
    """

    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    example: str | None = None
    model: Annotated[str, Field(pattern=r"^[\w.]+:\w+$")] | None = None
    targets: Annotated[list[str], Field(min_length=1)] = [DEFAULT_PROFILE]
    objective: Literal["reward", "pareto"] = "reward"
    sampler: Literal["tpe", "nsga2", "random", "amc", "netadapt"] = "tpe"
    # Scan each group's sensitivity first and enqueue the uniform ladder and greedy plans from it
    # (search.study.sensitivity); netadapt always scans (the scan is its latency table).
    sensitivity_start: bool = False
    # Fine-tuning steps of the final recovery of the Pareto set when a search ends (0: none).
    final_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    # Optuna's pruning of trials (not of the model): latency is measured before recovery, and a
    # trial whose reward before fine-tuning is below the median of earlier trials' is stopped
    # there (stored PRUNED, counted in ``trials``; see search.study.objective).
    trial_pruning: Literal["none", "median"] = "none"
    trials: Annotated[int, Field(ge=1, le=1_000_000)] | None = 20
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    constraints: ConstraintsConfig = ConstraintsConfig()
    recovery: RecoverySettings = RecoverySettings()
    importance: Literal["magnitude", "taylor", "lamp", "bn-scale", "llm-pruner", "movement"] = "magnitude"
    nm_criterion: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    # mean: a removed channel's average contribution (over calibration batches) goes back into
    # its consumers' bias or BatchNorm mean (search.pipeline.pruning.apply_pruning).
    compensation: Literal["none", "mean"] = "none"
    keep_ratios: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)] = list(
        DEFAULT_KEEP_RATIOS)
    ignored_layers: list[str] = []
    # A transformer's hidden size (embeddings, LayerNorms, the residual stream) as one more group.
    prune_hidden_size: bool = False
    # None: the base model's error plus DEFAULT_ERROR_TOLERANCE (see ``resolve_error_floor``).
    error_floor: Annotated[float, Field(ge=0, lt=1)] | None = None
    # numpy's and Optuna's samplers take a 32-bit unsigned seed.
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    max_consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    # measured: every new architecture is timed. hybrid: predicted where the predictor is
    # trusted, measured where it is not or where the trial could reach a front. predicted: the
    # predictor alone once trusted (fronts are measured at confirmation).
    latency: Literal["measured", "hybrid", "predicted"] = "measured"
    screening: ScreeningSettings = ScreeningSettings()
    # Where model work runs (recovery, calibration, scoring): auto, cpu, cuda, cuda:N or mps
    # (search.pipeline.device). Measurement stays with each target's backend.
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device_is_known(cls, value: str) -> str:
        if not re.match(DEVICE_PATTERN, value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="after")
    def _one_model_and_a_budget(self) -> SearchConfig:
        if (self.example is None) == (self.model is None):
            raise ValueError("give exactly one of 'example' (e.g. digits) or 'model' (package.module:function)")
        if self.trials is None and self.timeout_s is None:
            raise ValueError("give a budget: 'trials', 'timeout_s' or both")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets repeat: {self.targets}")
        if self.trial_pruning != "none":
            problem = self._why_trials_cannot_be_pruned()
            if problem is not None:
                raise ValueError(f"trial_pruning {self.trial_pruning}: {problem}; or use trial_pruning none")
        return self

    def _why_trials_cannot_be_pruned(self) -> str | None:
        if self.objective != "reward":
            return "Optuna prunes single-objective trials only; use objective reward"
        if self.sampler == "netadapt":
            return "netadapt keeps the most accurate candidate of each step after recovery; use another sampler"
        if self.latency != "measured":
            return "hybrid and predicted latency decide what to measure by the recovered error; use latency measured"
        if self.recovery.version != 2 or self.recovery.steps == 0 or self.recovery.holdout_batches == 0:
            return ("a trial is judged on its held-out error before fine-tuning; it needs recovery version 2 "
                    "with steps >= 1 and holdout_batches >= 1")
        return None

    @property
    def model_spec(self) -> str:
        return self.example or self.model or ""

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> SearchConfig:
        """A configuration as a search stored it, from any hwprune version.

        A stored recovery section without ``version`` predates version 2 (it has no
        ``optimizer``): its trials were recovered by version 1, whose learning rate defaulted to
        0.01. Filling in today's defaults instead would resume such a search, or re-materialise its
        trials, with another recovery than the one that scored them.
        """
        stored = dict(data)
        recovery = dict(stored.get("recovery") or {})
        if "version" not in recovery and "optimizer" not in recovery:
            recovery = {"version": 1, "lr": LEGACY_RECOVERY_LR, **recovery}
        # Searches stored before these settings existed recovered with one thread on the CPU.
        recovery.setdefault("threads", 1)
        stored["recovery"] = recovery
        stored.setdefault("device", "cpu")
        return cls.model_validate(stored)

    def for_this_machine(self) -> SearchConfig:
        """This configuration with what was left to the machine fixed: the recovery's thread
        count (the cores this process is given). A search stores this, never the open value."""
        if self.recovery.threads is not None:
            return self
        recovery = self.recovery.model_copy(update={"threads": cpu_count()})
        return self.model_copy(update={"recovery": recovery})


# The commented example of a search config file (the README shows it; a test checks it validates).
CONFIG_EXAMPLE = """\
# hwprune search config: `hwprune search start --config search.yaml` (flags win over the file).
# Every field and its limits: `hwprune search config --schema`.
name: resnet-cpu              # letters, digits, . _ -; a stored search of that name resumes
model: mypkg.models:bundle    # a plugin returning a ModelBundle; or `example: digits` instead
targets: [cpu-ort-fp32]       # hardware profiles; the first is primary (the reward's latency)
objective: reward             # reward (one number) or pareto (error and each target's latency)
sampler: tpe                  # tpe, amc, nsga2 or random
trials: 100                   # completed (or pruned) trials to reach, trial 0 (the dense base model) included
trial_pruning: none           # median: measure latency first, stop a trial before fine-tuning if hopeless
timeout_s: 3600               # and/or a time budget for one run, seconds
constraints:                  # limits, not penalties: a trial over one is infeasible
  latency_budget_ratio: 0.5   # at most half the base model's latency on the primary target
  # latency_budget_us: 800
  # error_ceiling: 0.1
recovery:                     # what each trial's error is measured after
  steps: 30                   # fine-tuning batches (0: adaptive batch-norm only)
  lr: 0.0003
  optimizer: adamw            # or sgd
  bn_batches: 2               # batches adaptive batch-norm re-estimates statistics on
  holdout_batches: 2          # batches held out to keep the better of before/after
  batchnorm: train            # frozen: fine-tune with BatchNorm statistics fixed (pretrained models, little data)
importance: magnitude         # channels: magnitude, taylor, lamp, bn-scale, llm-pruner, movement
nm_criterion: magnitude       # N:M masks: magnitude, wanda, sparsegpt
compensation: none            # mean: removed channels' average output goes back into their consumers
keep_ratios: [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]   # the share of a group's channels a plan may keep
ignored_layers: []            # layers never pruned, by module name
# error_floor: 0.02           # default: the base model's error + 0.01
seed: 0
max_consecutive_failures: 5
"""


# Errors within one point (0.01) of the base model's count as equal in the reward, so that a
# base error of 0 (fidelity to the dense model) does not make the dense model win by definition.
DEFAULT_ERROR_TOLERANCE = 0.01


def resolve_error_floor(config: SearchConfig, base_error: float) -> float:
    """The reward's error floor: the configured one, else the base error plus one point."""
    if config.error_floor is not None:
        return config.error_floor
    return min(0.99, base_error + DEFAULT_ERROR_TOLERANCE)


# ``device`` may change: each trial records the device it was recovered on, and re-materialises there.
RESUMABLE_FIELDS = frozenset({"trials", "timeout_s", "max_consecutive_failures", "final_steps", "device"})


def keep_stored_threads(stored: SearchConfig, new: SearchConfig) -> SearchConfig:
    """``new`` resuming ``stored``: a thread count left open takes the stored one, so a search
    resumed on a machine of another size recovers its trials as it began."""
    if new.recovery.threads is not None:
        return new
    return new.model_copy(update={"recovery": new.recovery.model_copy(update={"threads": stored.recovery.threads})})


def incompatibilities(stored: SearchConfig, new: SearchConfig) -> list[str]:
    """Fields whose values differ between a stored search and a new request, as ``a: x -> y``."""
    old, now = stored.model_dump(), new.model_dump()
    if now["recovery"]["threads"] is None:  # left open: the stored count stands
        now["recovery"]["threads"] = old["recovery"]["threads"]
    return [
        f"{key}: {old[key]!r} -> {now[key]!r}"
        for key in old
        if key not in RESUMABLE_FIELDS and old[key] != now[key]
    ]


def _listed(value: Any) -> Any:
    """A tuple given from Python (the API's keyword arguments) as the list a strict schema takes."""
    return list(value) if isinstance(value, tuple) else value


# The recovery a pretrained built-in example starts from (its file and flags win): measured with
# bench/recovery.py --example efficientnet-lite0@96 (docs/benchmarks.md, "Recovery on a pretrained
# network"), where re-estimating BatchNorm statistics, or training them, on crops of 14 photographs
# made agreement with the dense model worse, and frozen statistics with a lower rate improved it.
PRETRAINED_EXAMPLES = ("efficientnet-lite0",)
PRETRAINED_RECOVERY: dict[str, Any] = {"batchnorm": "frozen", "bn_batches": 0, "lr": 3e-5}
# And the pruning it starts from: mean compensation (same bench, ``--compensation``), which put
# back what 30 random plans' removed channels fed their consumers and lowered their disagreement.
PRETRAINED_PRUNING: dict[str, Any] = {"compensation": "mean"}


def load_search_config(path: Path | None, overrides: Mapping[str, Any]) -> SearchConfig:
    """Merge a YAML file (optional) with flag ``overrides`` (``None`` values are ignored); a
    pretrained built-in example starts from ``PRETRAINED_RECOVERY`` and ``PRETRAINED_PRUNING``.

    Raises:
        ConfigError: unreadable file, bad YAML, or a value the schema refuses; one line naming
            the field and what it accepts.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = read_yaml_file(path, what="config")
        except YamlInputError as exc:
            raise ConfigError(str(exc)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path.name}: expected a mapping of settings")
        data.update(loaded or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            data[key] = {**(data.get(key) or {}), **{k: _listed(v) for k, v in value.items() if v is not None}}
        else:
            data[key] = _listed(value)
    if isinstance(data.get("example"), str) and data["example"].partition("@")[0] in PRETRAINED_EXAMPLES:
        given = data.get("recovery")
        data["recovery"] = {**PRETRAINED_RECOVERY, **given} if isinstance(given, Mapping) else given or dict(
            PRETRAINED_RECOVERY)
        data = {**PRETRAINED_PRUNING, **data}
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        origin = f"search config {path.name} (with flags)" if path is not None else "search config"
        raise ConfigError(f"{origin}: {describe_validation_error(exc, SearchConfig)}") from None


HEARTBEAT_ENV = "HWPRUNE_HEARTBEAT_S"
GRACE_ENV = "HWPRUNE_GRACE_S"


def heartbeat_settings(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """Heartbeat interval and grace period in seconds (``HWPRUNE_HEARTBEAT_S``, ``HWPRUNE_GRACE_S``).

    A trial whose worker died is failed and retried once its heartbeat is older than the grace
    period; shorter values recover sooner at the cost of more database writes.
    """
    try:
        heartbeat = int(environ.get(HEARTBEAT_ENV, "10"))
        grace = int(environ.get(GRACE_ENV, str(3 * heartbeat)))
    except ValueError as exc:
        raise ConfigError(f"{HEARTBEAT_ENV} and {GRACE_ENV} must be whole seconds: {exc}") from None
    if heartbeat < 1 or grace <= heartbeat:
        raise ConfigError(f"need {HEARTBEAT_ENV} >= 1 and {GRACE_ENV} > {HEARTBEAT_ENV}, got {heartbeat}, {grace}")
    return heartbeat, grace
