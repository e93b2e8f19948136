"""A one-shot sensitivity scan and the first trials it suggests.

Each prunable group is cut alone to each of its options (every other group dense) and scored
without recovery: the error that cut adds, and the latency it saves on the primary target (a
paired ratio to the base model, from the measurement cache when the architecture was measured
before, else measured now through the search's meter, which files it in the cache; or skipped).
Stored on the study as the user attribute ``sensitivity``, shown by ``hwprune space --sensitivity``.

The scan shapes the first trials (``start_params``): the uniform ladder (every group at one ratio)
and, at the latency each rung is estimated to reach, the plan that gets there by cutting the
groups with the most latency saved per error added (a greedy walk on the per-group table, taking
savings and errors as additive). A sampler then starts from the shape of the problem instead of
noise, and NetAdapt (``search.study.netadapt``) uses the same table as its latency model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from latency_models import MeasurementKey, Meter
from search.pipeline.bundle import ModelBundle, seeded_error
from search.pipeline.device import CPU, ModelDevice, deterministic, move_model
from search.pipeline.onnx_export import export_onnx
from search.pipeline.plan import Plan
from search.pipeline.space import SearchSpace, apply
from search.storage import Repository
from search.storage.record import enqueue, read_sensitivity, write_sensitivity

if TYPE_CHECKING:
    from search.study.objective import SearchContext

logger = logging.getLogger(__name__)

# An added error below this counts as this much, so that free cuts rank by what they save.
_MIN_ERROR = 1e-3


@dataclass(frozen=True, slots=True)
class Cut:
    """One group cut alone to one option: the error it adds and its latency over the base."""

    group: str
    index: int
    ratio: float
    kept: int
    error: float
    latency_ratio: float | None


@dataclass(frozen=True, slots=True)
class Sensitivity:
    """The scan of one search: base error, every cut, where the latencies came from."""

    target: str
    base_error: float
    cuts: tuple[Cut, ...]
    latency_source: str  # "cache", "measured", "cache+measured" or "none"
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "base_error": self.base_error, "latency_source": self.latency_source,
                "elapsed_s": self.elapsed_s, "cuts": [asdict(c) for c in self.cuts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        return cls(target=str(data["target"]), base_error=float(data["base_error"]),
                   cuts=tuple(Cut(**c) for c in data["cuts"]), latency_source=str(data["latency_source"]),
                   elapsed_s=float(data["elapsed_s"]))

    @property
    def has_latency(self) -> bool:
        return all(c.latency_ratio is not None for c in self.cuts)

    def by_group(self) -> dict[str, dict[int, Cut]]:
        table: dict[str, dict[int, Cut]] = {}
        for cut in self.cuts:
            table.setdefault(cut.group, {})[cut.index] = cut
        return table

    def estimate(self, indices: Mapping[str, int], space: SearchSpace) -> tuple[float, float]:
        """(error added, latency ratio) of a plan given as option indices, taking each group's
        effect as additive; groups at full width add nothing."""
        table = self.by_group()
        added, saved = 0.0, 0.0
        for group in space.groups:
            index = indices.get(group.name, len(group.kept) - 1)
            cut = table.get(group.name, {}).get(index)
            if cut is None:
                continue
            added += max(0.0, cut.error - self.base_error)
            saved += 1.0 - (cut.latency_ratio if cut.latency_ratio is not None else 1.0)
        return added, 1.0 - saved


def stored(study: optuna.Study) -> Sensitivity | None:
    """The scan stored on ``study``, if any."""
    data = read_sensitivity(study)
    return Sensitivity.from_dict(data) if data else None


def scan(
    bundle: ModelBundle,
    space: SearchSpace,
    *,
    seed: int,
    base_error: float,
    importance: str = "magnitude",
    meter: Meter | None = None,
    measure: bool = True,
    artifact_dir: Path | None = None,
    batch_size: int = 1,
    repo: Repository | None = None,
    on_cut: Callable[[Cut], None] | None = None,
    device: ModelDevice = CPU,
    compensation: str = "none",
) -> Sensitivity:
    """Cut each group alone to each option below full width; score error (on ``device``) and latency.

    Latency: with a ``meter``, a cut whose architecture is in the measurement cache is read from
    it; any other is measured (and cached) when ``measure``, else left unknown. Without a meter,
    latency is skipped (``latency_source`` "none").
    """
    started = time.perf_counter()
    cuts: list[Cut] = []
    sources: set[str] = set()
    for group in space.groups:
        for index, (ratio, kept) in enumerate(zip(group.ratios, group.kept, strict=True)):
            if index == len(group.kept) - 1:
                continue  # full width: the base model itself
            pruned = apply(bundle.model, bundle.example_input, space, Plan(channels={group.name: ratio}),
                           importance=importance, calibration=bundle.train_loader, device=device,
                           compensation=compensation)
            with deterministic(device):
                error = seeded_error(bundle, move_model(pruned.model, device), seed, device)
            pruned.model.to("cpu")
            latency: float | None = None
            if meter is not None:
                key = MeasurementKey(pruned.signature, meter.profile.fingerprint(), meter.base.sha256)
                hit = meter.store.find_measurement(key)
                if hit is not None and hit.ratio is not None:
                    latency = hit.ratio
                    sources.add("cache")
                elif measure and artifact_dir is not None:
                    artifact = export_onnx(pruned.model, bundle.example_input, artifact_dir, batch_size=batch_size)
                    try:
                        if repo is not None:  # a remote agent fetches it from the artifact store
                            repo.put_artifact_file(artifact.path, artifact.sha256)
                        latency = meter.start(artifact.path, artifact.sha256, pruned.signature).result().ratio
                    finally:
                        artifact.path.unlink(missing_ok=True)
                    sources.add("measured")
            cut = Cut(group.name, index, ratio, kept, error, latency)
            cuts.append(cut)
            if on_cut is not None:
                on_cut(cut)
    source = "+".join(sorted(sources)) if sources and all(c.latency_ratio is not None for c in cuts) else (
        "none" if not sources else "partial:" + "+".join(sorted(sources)))
    result = Sensitivity(target=meter.profile.name if meter is not None else "", base_error=base_error,
                         cuts=tuple(cuts), latency_source=source, elapsed_s=time.perf_counter() - started)
    logger.info("sensitivity scan: %d cuts in %.1f s (latency: %s)", len(cuts), result.elapsed_s, source)
    return result


def uniform_indices(space: SearchSpace, ratio: float) -> dict[str, int]:
    """Option index per group for every group at keep-``ratio`` (each group's offer nearest to
    that share of its width)."""
    indices = {}
    for group in space.groups:
        wanted = ratio * group.size
        indices[group.name] = min(range(len(group.kept)), key=lambda i: (abs(group.kept[i] - wanted), -i))
    return indices


def greedy_indices(space: SearchSpace, sensitivity: Sensitivity, latency_ratio: float) -> dict[str, int]:
    """Cut groups, most latency saved per error added first, until the estimated latency ratio
    reaches ``latency_ratio`` (or nothing is left to cut)."""
    table = sensitivity.by_group()
    indices = {g.name: len(g.kept) - 1 for g in space.groups}

    def effect(name: str, index: int) -> tuple[float, float]:
        cut = table.get(name, {}).get(index)
        if cut is None or cut.latency_ratio is None:
            return 0.0, 0.0
        return max(0.0, cut.error - sensitivity.base_error), 1.0 - cut.latency_ratio

    while sensitivity.estimate(indices, space)[1] > latency_ratio:
        best: tuple[float, str, int] | None = None
        for group in space.groups:
            current = indices[group.name]
            error_now, saved_now = effect(group.name, current)
            for index in range(current):
                error, saved = effect(group.name, index)
                gain = saved - saved_now
                if gain <= 0:
                    continue
                score = gain / max(_MIN_ERROR, error - error_now)
                if best is None or score > best[0]:
                    best = (score, group.name, index)
        if best is None:
            break
        indices[best[1]] = best[2]
    return indices


def to_params(space: SearchSpace, indices: Mapping[str, int]) -> dict[str, Any]:
    """Optuna parameters for a plan given as option indices (N:M layers dense)."""
    params = space.dense_params()
    params.update({f"keep:{name}": index for name, index in indices.items()})
    return params


def start_params(space: SearchSpace, sensitivity: Sensitivity, *,
                 ladder: tuple[float, ...] | None = None) -> list[dict[str, Any]]:
    """The first trials: the uniform ladder (by default the grid's keep-ratios from 0.5 up to,
    not including, 1), then a greedy plan at each rung's estimated latency (none when the scan
    has no latencies). Duplicates and the dense plan are dropped."""
    if ladder is None:
        ladder = tuple(r for r in space.keep_ratios if 0.5 <= r < 1.0)
    plans: list[dict[str, Any]] = []
    rungs = [uniform_indices(space, ratio) for ratio in ladder]
    for indices in rungs:
        plans.append(to_params(space, indices))
    if sensitivity.has_latency:
        for indices in rungs:
            target = sensitivity.estimate(indices, space)[1]
            plans.append(to_params(space, greedy_indices(space, sensitivity, target)))
    unique: list[dict[str, Any]] = []
    for params in plans:
        if params not in unique and params != space.dense_params():
            unique.append(params)
    return unique


def enqueue_start(study: optuna.Study, space: SearchSpace, sensitivity: Sensitivity) -> int:
    """Store the scan on ``study`` and enqueue its start plans; returns how many."""
    write_sensitivity(study, sensitivity.to_dict())
    plans = start_params(space, sensitivity)
    for params in plans:
        enqueue(study, params, start="sensitivity", skip_if_exists=True)
    return len(plans)


def prepare_start(study: optuna.Study, ctx: SearchContext, *, enqueue: bool) -> Sensitivity:
    """The search's scan: the stored one, else scanned now on the primary target (measuring what
    the cache lacks) and stored; with ``enqueue``, a new scan's start plans are enqueued too."""
    found = stored(study)
    if found is not None:
        return found
    found = scan(ctx.bundle, ctx.space, seed=ctx.config.seed, base_error=ctx.base_error,
                 importance=ctx.config.importance, meter=ctx.meters[0], repo=ctx.repo,
                 artifact_dir=ctx.artifact_dir, batch_size=ctx.batch_size, device=ctx.device,
                 compensation=ctx.config.compensation)
    if enqueue:
        count = enqueue_start(study, ctx.space, found)
        logger.info("sensitivity start: %d plans enqueued", count)
    else:
        write_sensitivity(study, found.to_dict())
    return found
