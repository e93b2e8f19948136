"""Write a pruned model to a folder: ONNX, a reloadable PyTorch state, the plan and a manifest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.config import SearchConfig
from search.errors import ConfigError, SearchError
from search.pipeline.bundle import ModelBundle
from search.pipeline.onnx_export import OnnxArtifact, export_onnx
from search.pipeline.plan import Plan
from search.pipeline.pruning import PrunedModel
from search.pipeline.recovery import recover, recovery_for, with_steps
from search.pipeline.space import SearchSpace, apply

STATE_FILE = "model.pt"


def write_model_dir(
    out: Path,
    *,
    bundle: ModelBundle,
    plan: Plan,
    pruned: PrunedModel,
    artifact: OnnxArtifact,
    importance: str,
    nm_criterion: str = "magnitude",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Create ``out`` with ``model.onnx``, ``model.pt``, ``plan.yaml`` and ``manifest.json``."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifact.path, out / "model.onnx")
    torch.save(
        {
            "state_dict": pruned.model.state_dict(),
            "plan": plan.to_dict(),
            "importance": importance,
            "nm_criterion": nm_criterion,
            "base_fingerprint": bundle.fingerprint(),
        },
        out / STATE_FILE,
    )
    plan.dump(out / "plan.yaml")
    manifest = {
        "base_model": bundle.name,
        "base_fingerprint": bundle.fingerprint(),
        "onnx_sha256": artifact.sha256,
        "batch_size": artifact.batch_size,
        "macs": pruned.macs,
        "params": pruned.params,
        "signature": pruned.signature,
        "kept": dict(pruned.kept),
        "sparsity": dict(pruned.patterns),
        "importance": importance,
        "nm_criterion": nm_criterion,
        "torch_pruning_warnings": list(pruned.warnings),
        **(dict(extra) if extra else {}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def load_pruned(path: Path, bundle: ModelBundle, space: SearchSpace) -> nn.Module:
    """Rebuild a pruned model from ``model.pt``: re-apply its plan to the base, load the weights.

    Raises:
        ConfigError: the base model is not the one the state was made from.
    """
    state = torch.load(path, weights_only=True)
    if state["base_fingerprint"] != bundle.fingerprint():
        raise ConfigError(
            f"{path} was pruned from a different base model (fingerprint "
            f"{state['base_fingerprint'][:12]}, this base {bundle.fingerprint()[:12]})"
        )
    plan = Plan.from_dict(state["plan"])
    pruned = apply(bundle.model, bundle.example_input, space, plan, importance="magnitude")
    pruned.model.load_state_dict(state["state_dict"])
    return pruned.model.eval()


def rebuild_trial(
    *,
    bundle: ModelBundle,
    space: SearchSpace,
    config: SearchConfig,
    attrs: Mapping[str, Any],
    base_signature: str,
    artifact_dir: Path,
    batch_size: int,
    finetune_steps: int = 0,
) -> tuple[Plan, PrunedModel, OnnxArtifact]:
    """Re-create a stored trial's model from its plan, exactly as the trial built it.

    The plan is applied with the search's importance and N:M criterion and recovered with the
    search's recovery and seed; the ONNX export must reproduce the trial's stored sha256 (before
    any extra ``finetune_steps``), which proves the model is the one that was measured.

    Raises:
        SearchError: the rebuilt model differs from the stored one.
    """
    plan = Plan.from_dict(attrs["plan"])
    pruned = apply(bundle.model, bundle.example_input, space, plan, importance=config.importance,
                   nm_criterion=config.nm_criterion, calibration=bundle.train_loader)
    if pruned.signature != base_signature:
        recover(pruned.model, bundle, recovery_for(config), masks=pruned.masks)
    artifact = export_onnx(pruned.model, bundle.example_input, artifact_dir, batch_size=batch_size)
    expected = attrs.get("artifact_sha256")
    if expected and artifact.sha256 != expected:
        raise SearchError(
            f"the rebuilt model's ONNX ({artifact.sha256[:12]}) differs from the measured one "
            f"({str(expected)[:12]}): torch or torch-pruning versions may have changed since the search"
        )
    if finetune_steps > 0:
        extra = recovery_for(config)
        recover(pruned.model, bundle, with_steps(extra, finetune_steps, seed=extra.seed + 1),
                masks=pruned.masks)
        artifact = export_onnx(pruned.model, bundle.example_input, artifact_dir, batch_size=batch_size)
    return plan, pruned, artifact
