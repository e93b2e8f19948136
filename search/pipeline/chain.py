"""The trial chain: plan -> apply -> recover -> score -> export, written once.

A search's trials, the re-materialisation of a stored trial (export, confirmation, final
recovery), ``search.api.apply_plan``/``export_plan`` and the base model all run this function, so
that a replay is bit-identical because there is only one sequence to replay. What the steps
depend on besides the model (importance, N:M criterion, recovery, seed, export batch) is one
``ChainSettings``: a setting added there reaches every caller.

Model work (recovery, scoring) runs on ``ChainSettings.device``: the pruned copy moves there after
pruning and back to the CPU before export, so an ONNX file never depends on where it was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from search.config import RecoverySettings, SearchConfig
from search.pipeline.bundle import ModelBundle, seeded_error
from search.pipeline.device import CPU, ModelDevice, deterministic, move_model, teacher_on
from search.pipeline.onnx_export import OnnxArtifact, export_onnx
from search.pipeline.plan import Plan
from search.pipeline.pruning import PrunedModel, architecture_signature
from search.pipeline.recovery import RecoveryReport, recover_with_report
from search.pipeline.space import SearchSpace, apply

# A stage wrapper: times a step and names it when it fails (``search.study.objective``).
Stage = Callable[[str], AbstractContextManager[None]]
# Called with the pruned model before recovery; may return a check recovery calls with the
# held-out error before fine-tuning (a search's trial pruning raises from it).
OnPruned = Callable[[PrunedModel], Callable[[float], None] | None]


@contextmanager
def _untimed(_name: str) -> Iterator[None]:
    yield


@dataclass(frozen=True, slots=True)
class ChainSettings:
    """What the chain's steps depend on besides the model and the plan.

    Attributes:
        importance: channel importance for pruning (``search.pipeline.pruning``).
        nm_criterion: how N:M masks are chosen (magnitude, wanda, sparsegpt).
        recovery: the recovery after pruning.
        seed: seeds recovery and the scoring of the validation error.
        batch_size: the batch the ONNX export is traced at (its batch axis is dynamic).
        dynamo: export with ``torch.onnx``'s dynamo exporter.
        dynamic_check: also check the file at another batch size and with ``onnx.checker``
            (files handed to a user and the base's; a trial's file is checked at its shapes only).
        device: where recovery and scoring run (``search.pipeline.device``).
        compensation: what removed channels leave behind in their consumers ("none", "mean").
    """

    importance: str = "magnitude"
    nm_criterion: str = "magnitude"
    recovery: RecoverySettings = field(default_factory=lambda: RecoverySettings(steps=0))
    seed: int = 0
    batch_size: int = 1
    dynamo: bool = False
    dynamic_check: bool = False
    device: ModelDevice = CPU
    compensation: str = "none"

    @classmethod
    def for_search(cls, config: SearchConfig, *, batch_size: int, device: ModelDevice = CPU,
                   dynamic_check: bool = False) -> ChainSettings:
        """The settings a search's trials run with."""
        return cls(importance=config.importance, nm_criterion=config.nm_criterion, recovery=config.recovery,
                   seed=config.seed, batch_size=batch_size, dynamic_check=dynamic_check, device=device,
                   compensation=config.compensation)


@dataclass(frozen=True)
class Chained:
    """What the chain made: the model (pruned, recovered), its error and its ONNX file.

    ``pruned`` is None for the base model itself; ``recovery`` lists each recovery pass as
    ``{"steps", "kept"}``; ``report`` is the last pass's (None when recovery was skipped).
    """

    model: nn.Module
    plan: Plan | None
    pruned: PrunedModel | None
    signature: str
    error: float | None
    artifact: OnnxArtifact | None
    report: RecoveryReport | None = None
    recovery: tuple[dict[str, Any], ...] = ()


def run_chain(
    bundle: ModelBundle,
    space: SearchSpace | None,
    plan: Plan | None,
    settings: ChainSettings,
    *,
    out: Path | None,
    base_signature: str | None = None,
    base_error: float | None = None,
    stage: Stage = _untimed,
    on_pruned: OnPruned | None = None,
    score: bool = True,
) -> Chained:
    """Apply ``plan`` to a copy of the base model, recover it, score it on the validation data
    and export it to ONNX into ``out`` (no export when ``out`` is None).

    ``plan`` None is the base model itself: nothing applied, nothing recovered. A plan whose
    architecture is the base's (``base_signature``) is not recovered either, and scores
    ``base_error`` when given. ``stage(name)`` wraps each step ("prune", "recover", "evaluate",
    "export"); ``on_pruned`` sees the pruned model before recovery. Without ``score`` the error is
    not measured (None): a replay that only needs the model and its file.
    """
    pruned: PrunedModel | None = None
    if plan is None or space is None:
        model, signature = bundle.model, architecture_signature(bundle.model, {})
    else:
        with stage("prune"):
            pruned = apply(bundle.model, bundle.example_input, space, plan, importance=settings.importance,
                           nm_criterion=settings.nm_criterion, calibration=bundle.train_loader,
                           device=settings.device, compensation=settings.compensation)
        model, signature = pruned.model, pruned.signature
    check = on_pruned(pruned) if on_pruned is not None and pruned is not None else None
    is_base = pruned is None or signature == base_signature
    report = None
    device = settings.device
    with deterministic(device):
        on_device = teacher_on(model, device) if pruned is None else move_model(model, device)
        with stage("recover"):
            if not is_base and pruned is not None:
                report = recover_with_report(on_device, bundle, settings.recovery, seed=settings.seed,
                                             masks=pruned.masks, before_finetune=check, device=device)
        error = None
        if score:
            with stage("evaluate"):
                error = (base_error if is_base and base_error is not None
                         else seeded_error(bundle, on_device, settings.seed, device))
    if pruned is not None and device.kind != "cpu":
        model.to("cpu")  # export, signatures and hashes always see the CPU copy
    passes: tuple[dict[str, Any], ...] = (
        () if report is None else ({"steps": settings.recovery.steps, "kept": report.kept},))
    return Chained(model, plan, pruned, signature, error, export(model, bundle, settings, out, stage), report,
                   passes)


def export(model: nn.Module, bundle: ModelBundle, settings: ChainSettings, out: Path | None,
           stage: Stage = _untimed) -> OnnxArtifact | None:
    """The chain's export step on its own (a search measures before recovery with it)."""
    if out is None:
        return None
    with stage("export"):
        return export_onnx(model, bundle.example_input, out, batch_size=settings.batch_size, dynamo=settings.dynamo,
                           dynamic_check=settings.dynamic_check)


def recover_further(chained: Chained, bundle: ModelBundle, settings: ChainSettings, steps: int, *,
                    out: Path | None) -> Chained:
    """Continue a chain with ``steps`` more fine-tuning (another seed), then score and export
    again: the final recovery of a front and an export's ``--finetune-steps``."""
    more = settings.recovery.model_copy(update={"steps": steps})
    masks = chained.pruned.masks if chained.pruned is not None else None
    device = settings.device
    with deterministic(device):
        model = move_model(chained.model, device)
        report = recover_with_report(model, bundle, more, seed=settings.seed + 1, masks=masks, device=device)
        error = seeded_error(bundle, model, settings.seed, device)
    if device.kind != "cpu":
        chained.model.to("cpu")
    return Chained(chained.model, chained.plan, chained.pruned, chained.signature, error,
                   export(chained.model, bundle, settings, out), report,
                   (*chained.recovery, {"steps": steps, "kept": report.kept}))
