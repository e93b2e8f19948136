"""The search space: one keep-ratio decision per prunable group, one N:M decision per eligible layer.

Built once per model and set of hardware profiles. Kept channel counts are rounded to the
profiles' channel multiple (so the space only holds shapes the targets run well) and a group is
never pruned to zero; N:M patterns are offered only on layers that can take them and only where at
least one profile declares it runs that pattern faster.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from torch import nn

from hardware_profiles import HardwareProfile, parse_pattern
from search.config import DEFAULT_KEEP_RATIOS
from search.errors import PlanError
from search.pipeline.device import CPU, ModelDevice
from search.pipeline.inputs import ModelInput
from search.pipeline.plan import Plan
from search.pipeline.pruning import Discovery, GroupInfo, PrunedModel, apply_pruning, discover

DENSE = "dense"


def kept_units(size: int, ratio: float, multiple: int) -> int:
    """Units kept of ``size`` at keep-``ratio``, rounded to the nearest ``multiple``.

    Never below one multiple (or one unit), never above ``size``; a ratio of 1.0 keeps all.
    """
    if ratio >= 1.0:
        return size
    if multiple <= 1:
        return max(1, min(size, math.floor(ratio * size + 0.5)))
    if size <= multiple:
        return size
    rounded = math.floor(ratio * size / multiple + 0.5) * multiple
    return max(multiple, min(size, rounded))


@dataclass(frozen=True, slots=True)
class GroupChoice:
    """The decision for one group: which keep-ratios it offers and what each keeps."""

    name: str
    kind: str
    size: int
    unit_width: int
    multiple: int
    members: tuple[str, ...]
    mac_share: float
    ratios: tuple[float, ...]
    kept: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SparsityChoice:
    """The decision for one layer: dense or one of the N:M patterns a target accelerates."""

    layer: str
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class SearchSpace:
    """All decisions of a search, in layer order (AMC's define-by-run order)."""

    groups: tuple[GroupChoice, ...]
    sparsity: tuple[SparsityChoice, ...]
    fixed: Mapping[str, str]
    channel_multiple: int
    keep_ratios: tuple[float, ...]
    output_layer: str
    ignored: tuple[str, ...]
    base_macs: int
    base_params: int
    _infos: tuple[GroupInfo, ...]
    notes: Mapping[str, str] = field(default_factory=dict)

    def group(self, name: str) -> GroupChoice:
        for choice in self.groups:
            if choice.name == name:
                return choice
        raise PlanError(self._unknown("group", name, [g.name for g in self.groups]))

    @staticmethod
    def _unknown(what: str, name: str, known: Sequence[str]) -> str:
        listed = ", ".join(known) if known else "(none)"
        return f"unknown {what} {name!r}; the space has: {listed}"

    def resolve(self, plan: Plan) -> Plan:
        """``plan`` with kept channel counts (ints) turned into the keep-ratios that keep them.

        Raises:
            PlanError: a count that is not one of its group's options.
        """
        names = {g.name: g for g in self.groups}
        channels: dict[str, float] = {}
        for name, value in plan.channels.items():
            group = names.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and group is not None:
                if value not in group.kept:
                    raise PlanError(
                        f"kept channels for {name!r} must be one of {', '.join(map(str, group.kept))}, "
                        f"got {value} (a keep-ratio is written with a decimal point, e.g. 1.0 or 0.5)")
                channels[name] = group.ratios[group.kept.index(value)]
            else:
                channels[name] = float(value) if group is not None else value
        return Plan(channels=channels, sparsity=dict(plan.sparsity))

    def template(self, title: str) -> str:
        """A plan file (YAML) naming every group and N:M layer, dense, with the options as comments."""
        lines = [
            f"# {title}",
            "# channels: kept channels per group: a count (an integer, one of the options) or a keep-ratio",
            f"#   (a decimal in (0, 1], rounded to the nearest option; multiples of {self.channel_multiple}).",
            "#   A group left out stays dense.",
            "# sparsity: an N:M pattern per eligible layer (e.g. \"2:4\") or dense. A layer left out stays dense.",
            "channels:" if self.groups else "channels: {}",
        ]
        for g in self.groups:
            options = ", ".join(f"{k} ({k / g.size:.3g})" for k in g.kept)
            lines.append(f"  # {g.kind}, {g.size} wide, {100 * g.mac_share:.1f}% of MACs; layers: "
                         + " ".join(g.members))
            lines.append(f"  # options, count (share of {g.size}): {options}")
            lines.append(f"  {json.dumps(g.name)}: {g.size}")
        lines.append("sparsity:" if self.sparsity else "sparsity: {}")
        for choice in self.sparsity:
            lines.append(f"  # options: {', '.join((DENSE, *choice.patterns))}")
            lines.append(f"  {json.dumps(choice.layer)}: {DENSE}")
        for name, why in self.fixed.items():
            lines.append(f"# not prunable: {name}: {why}")
        return "\n".join(lines) + "\n"

    def validate(self, plan: Plan) -> None:
        """Check a plan against the space.

        Raises:
            PlanError: unknown names, ratios out of range, patterns a layer cannot take.
        """
        names = {g.name: g for g in self.groups}
        for name, ratio in plan.channels.items():
            if name not in names:
                hint = f" ({self.fixed[name]})" if name in self.fixed else ""
                raise PlanError(self._unknown("group", name, list(names)) + hint)
            low = min(names[name].ratios)
            if not (low <= ratio <= 1.0) or math.isnan(ratio):
                raise PlanError(f"ratio for {name!r} must be in [{low:g}, 1], got {ratio:g}")
        layers = {s.layer: s for s in self.sparsity}
        for layer, pattern in plan.sparsity.items():
            if layer not in layers:
                raise PlanError(
                    self._unknown("N:M-eligible layer", layer, list(layers))
                    + " (eligible: dense Conv2d/Linear with input size divisible by M, on a "
                    "target that runs N:M)"
                )
            allowed = (DENSE, *layers[layer].patterns)
            if pattern not in allowed:
                raise PlanError(
                    f"sparsity for {layer!r} must be one of {', '.join(allowed)}, got {pattern!r}"
                )

    def kept(self, plan: Plan) -> dict[str, int]:
        """Kept units per group for a valid plan."""
        return {
            g.name: kept_units(g.size, plan.channels.get(g.name, 1.0), g.multiple)
            for g in self.groups
        }

    def dense_plan(self) -> Plan:
        return Plan()

    def suggest(self, trial: optuna.Trial) -> Plan:
        """Ask Optuna for one decision per group and per N:M layer, in layer order.

        Keep-ratios are suggested as an index into each group's distinct kept counts, so the
        sampler sees an ordered integer, not an unordered category.
        """
        channels = {}
        for group in self.groups:
            index = trial.suggest_int(f"keep:{group.name}", 0, len(group.kept) - 1)
            channels[group.name] = group.ratios[index]
        sparsity = {
            choice.layer: str(trial.suggest_categorical(f"nm:{choice.layer}", (DENSE, *choice.patterns)))
            for choice in self.sparsity
        }
        return Plan(channels=channels, sparsity={k: v for k, v in sparsity.items() if v != DENSE})

    def dense_params(self) -> dict[str, Any]:
        """Optuna parameters that make ``suggest`` return the dense plan (trial 0)."""
        params: dict[str, Any] = {f"keep:{g.name}": len(g.kept) - 1 for g in self.groups}
        params.update({f"nm:{s.layer}": DENSE for s in self.sparsity})
        return params

    def uniform_plan(self, ratio: float) -> Plan:
        """Every group at the same keep-ratio (clipped to each group's lowest offer), no N:M."""
        return Plan(channels={g.name: max(ratio, min(g.ratios)) for g in self.groups})

    def random_plan(self, rng: random.Random) -> Plan:
        """A plan drawn uniformly: each group's kept count and each layer's N:M choice."""
        channels = {g.name: g.ratios[rng.randrange(len(g.ratios))] for g in self.groups}
        sparsity = {s.layer: rng.choice((DENSE, *s.patterns)) for s in self.sparsity}
        return Plan(channels=channels, sparsity={k: v for k, v in sparsity.items() if v != DENSE})

    def layer_widths(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per Conv/Linear layer whose width a plan can change: the input widths and the output
        widths it can run at (the other side at its base width is left out: callers fill it in).
        Channel groups only (attention heads are left out). For latency lookup tables."""
        searchable = {g.name: g for g in self.groups}
        inputs: dict[str, set[int]] = {}
        outputs: dict[str, set[int]] = {}
        for info in self._infos:
            choice = searchable.get(info.name)
            if choice is None or info.kind != "channels":
                continue
            widths = {k * info.unit_width for k in choice.kept}
            for member in info.members:
                if member not in info.consumers:
                    outputs.setdefault(member, set()).update(widths)
            for consumer in info.consumers:
                inputs.setdefault(consumer, set()).update(widths)
        return {name: (tuple(sorted(inputs.get(name, ()))), tuple(sorted(outputs.get(name, ()))))
                for name in sorted(set(inputs) | set(outputs))}

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel_multiple": self.channel_multiple,
            "keep_ratios": list(self.keep_ratios),
            "output_layer": self.output_layer,
            "ignored": list(self.ignored),
            "base_macs": self.base_macs,
            "base_params": self.base_params,
            "groups": [asdict(g) for g in self.groups],
            "sparsity": [asdict(s) for s in self.sparsity],
            "fixed": dict(self.fixed),
            "notes": dict(self.notes),
        }

    def fingerprint(self) -> str:
        """Hash of every decision and its options: two searches can share trials only if equal."""
        blob = json.dumps(
            {"groups": [asdict(g) for g in self.groups], "sparsity": [asdict(s) for s in self.sparsity]},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def channel_multiple(profiles: Sequence[HardwareProfile]) -> int:
    """The least common multiple of the profiles' channel multiples: good shapes on every target."""
    multiple = 1
    for profile in profiles:
        multiple = math.lcm(multiple, profile.channel_multiple)
    return multiple


def _sparsity_choices(discovery: Discovery, profiles: Sequence[HardwareProfile],
                      kept_options: Mapping[str, tuple[int, ...]]) -> list[SparsityChoice]:
    """The N:M patterns each layer may take: those a target runs whose M divides every input
    width the layer can have once its input group is pruned."""
    input_widths: dict[str, set[int]] = {}
    for info in discovery.groups:
        for consumer in info.consumers:
            widths = {k * info.unit_width for k in kept_options.get(info.name, (info.size,))}
            input_widths.setdefault(consumer, set()).update(widths)
    patterns = sorted({p for profile in profiles for p in profile.sparsity_patterns},
                      key=lambda p: parse_pattern(p))
    sparsity: list[SparsityChoice] = []
    if patterns:
        for name, layer in discovery.layers.items():
            if name in discovery.ignored or layer.groups != 1:
                continue
            widths = input_widths.get(name, {layer.in_size})
            fits = tuple(p for p in patterns if all(w % parse_pattern(p)[1] == 0 for w in widths))
            if fits:
                sparsity.append(SparsityChoice(name, fits))
    return sparsity


def build_space(
    model: nn.Module,
    example: ModelInput,
    profiles: Sequence[HardwareProfile],
    *,
    keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS,
    ignored: Sequence[str] = (),
    hidden_size: bool = False,
) -> SearchSpace:
    """Discover the groups of ``model`` and turn them into decisions for ``profiles``.

    ``hidden_size`` offers a transformer's hidden size (embeddings, LayerNorms and every layer
    reading the residual stream) as one more group; off by default.

    Raises:
        PlanError: a keep-ratio outside (0, 1], or an unknown ignored layer name.
    """
    ratios = tuple(sorted(set(float(r) for r in keep_ratios) | {1.0}))
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad:
        raise PlanError(f"keep-ratios must be in (0, 1], got {bad}")
    discovery = discover(model, example, ignored=ignored, hidden_size=hidden_size)
    multiple = channel_multiple(profiles)
    groups: list[GroupChoice] = []
    fixed: dict[str, str] = {}
    notes: dict[str, str] = {}
    kept_options: dict[str, tuple[int, ...]] = {}
    for info in discovery.groups:
        unit_multiple = 1 if info.kind in ("heads", "kv-heads") else multiple
        offered: dict[int, float] = {}
        for ratio in ratios:
            offered.setdefault(kept_units(info.size, ratio, unit_multiple), ratio)
        kept_options[info.name] = tuple(sorted(offered))
        off = [k * info.unit_width for k in sorted(offered) if (k * info.unit_width) % multiple]
        if info.kind in ("heads", "kv-heads") and off:
            # Heads are whole units: the targets' channel multiple cannot be met by rounding them.
            notes[info.name] = (
                f"heads of {info.unit_width} channels: {', '.join(map(str, off))} channels "
                f"are not multiples of {multiple}, the targets' channel multiple"
            )
        if len(offered) < 2:
            fixed[info.name] = (
                f"{info.size} {info.kind} cannot be rounded to a multiple of {unit_multiple} "
                "below the full width"
            )
            continue
        groups.append(
            GroupChoice(
                name=info.name,
                kind=info.kind,
                size=info.size,
                unit_width=info.unit_width,
                multiple=unit_multiple,
                members=info.members,
                mac_share=round(info.mac_share, 6),
                ratios=tuple(offered[k] for k in sorted(offered)),
                kept=tuple(sorted(offered)),
            )
        )
    return SearchSpace(
        groups=tuple(groups),
        sparsity=tuple(_sparsity_choices(discovery, profiles, kept_options)),
        fixed=fixed,
        channel_multiple=multiple,
        keep_ratios=ratios,
        output_layer=discovery.output_layer,
        ignored=discovery.ignored,
        base_macs=discovery.macs,
        base_params=discovery.params,
        _infos=discovery.groups,
        notes=notes,
    )


def apply(
    base: nn.Module,
    example: ModelInput,
    space: SearchSpace,
    plan: Plan,
    *,
    importance: str = "magnitude",
    nm_criterion: str = "magnitude",
    calibration: Any = None,
    retrace: bool = False,
    device: ModelDevice = CPU,
    compensation: str = "none",
) -> PrunedModel:
    """Validate ``plan`` against ``space`` and apply it to a copy of ``base``.

    Deterministic: the same plan on the same base gives bit-identical weights. ``nm_criterion``
    chooses the N:M masks (magnitude, wanda or sparsegpt; the last two calibrate on
    ``calibration``, the training loader). ``retrace`` traces torch-pruning's graph afresh
    instead of copying the one traced at the first apply (same result, slower). Calibration
    (gradient importances, Wanda, SparseGPT) runs on ``device``; the returned model is on the CPU.
    ``compensation`` "mean" puts each removed channel's mean contribution (over ``calibration``)
    back into its consumers (``search.pipeline.pruning.apply_pruning``).
    """
    plan = space.resolve(plan)
    space.validate(plan)
    searchable = {g.name for g in space.groups}
    infos = [info for info in space._infos if info.name in searchable]
    patterns = {
        layer: parse_pattern(pattern) for layer, pattern in plan.sparsity.items() if pattern != DENSE
    }
    return apply_pruning(
        base,
        example,
        kept=space.kept(plan),
        groups=infos,
        patterns=patterns,
        importance=importance,
        nm_criterion=nm_criterion,
        calibration=calibration,
        retrace=retrace,
        device=device,
        compensation=compensation,
    )
