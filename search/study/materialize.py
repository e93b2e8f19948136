"""Write a pruned model to a folder and read it back.

A folder holds ``model.onnx``, ``model.pt`` (the pruned weights, reloaded by ``load_model_dir``
from the base model the manifest names), ``model.pt2`` (a ``torch.export`` program that loads
without hwprune or the plugin: ``torch.export.load(path).module()``), ``plan.yaml`` and
``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.config import SearchConfig
from search.errors import ConfigError, SearchError
from search.examples import load_bundle
from search.pipeline import inputs as model_inputs
from search.pipeline.bundle import ModelBundle
from search.pipeline.chain import ChainSettings, recover_further, run_chain
from search.pipeline.device import CPU, ModelDevice
from search.pipeline.inputs import ModelInput
from search.pipeline.onnx_export import OnnxArtifact
from search.pipeline.plan import Plan
from search.pipeline.pruning import PrunedModel, apply_pruning, discover
from search.pipeline.space import SearchSpace, apply

logger = logging.getLogger(__name__)

STATE_FILE = "model.pt"
PROGRAM_FILE = "model.pt2"
MANIFEST_FILE = "manifest.json"
# The batch range of the self-contained program's dynamic batch dimension.
MAX_BATCH = 4096


def export_program(model: nn.Module, example: ModelInput, path: Path) -> str | None:
    """Save ``model`` as a ``torch.export`` program with a dynamic batch dimension (and sequence
    dimension, on token inputs, as the ONNX file has).

    Returns None on success, else why it could not be exported (a model ``torch.export`` cannot
    trace, e.g. with data-dependent control flow); the folder is still complete without it.
    """
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # Traced at batch 2: at batch 1 torch.export would specialise the dimension to the constant 1.
    inputs = model_inputs.batched(example, 2)
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = {}
    shapes: Any

    def axes(tensor: torch.Tensor) -> dict[int, Any]:
        # The ONNX export's axes (search.pipeline.inputs.dynamic_axes): token inputs keep a
        # dynamic sequence too, its range (the position embeddings' length) left to torch.export.
        if tensor.dim() == 2 and not tensor.is_floating_point():
            return {0: batch, 1: torch.export.Dim.DYNAMIC}
        return {0: batch}

    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
        shapes = {name: axes(tensor) for name, tensor in inputs.items()}
    elif isinstance(inputs, tuple):
        args, shapes = inputs, tuple(axes(tensor) for tensor in inputs)
    else:
        args, shapes = (inputs,), (axes(inputs),)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model.eval(), args, kwargs, dynamic_shapes=shapes)
            torch.export.save(program, str(path))
    except Exception as exc:  # torch.export's failures are many and all mean "no program"
        logger.warning("no self-contained %s: torch.export failed: %s", path.name, exc)
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def write_model_dir(
    out: Path,
    *,
    bundle: ModelBundle,
    plan: Plan,
    pruned: PrunedModel,
    artifact: OnnxArtifact,
    importance: str,
    model_spec: str | None,
    ignored_layers: tuple[str, ...] | list[str] = (),
    nm_criterion: str = "magnitude",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Create ``out`` with ``model.onnx``, ``model.pt``, ``model.pt2``, ``plan.yaml`` and
    ``manifest.json``; ``model_spec`` (the plugin or example the base came from) is recorded so
    that ``load_model_dir`` needs nothing but the folder."""
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
    program_error = export_program(pruned.model, bundle.example_input, out / PROGRAM_FILE)
    manifest = {
        "format": 2,
        "model_spec": model_spec,
        "ignored_layers": list(ignored_layers),
        "self_contained": None if program_error else PROGRAM_FILE,
        **({"self_contained_error": program_error} if program_error else {}),
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
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an exported folder.

    Raises:
        ConfigError: no folder, no manifest, or a manifest that is not a JSON object.
    """
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{str(folder)!r} is not an hwprune export: no {MANIFEST_FILE} in it "
                          "(give the folder `hwprune export --out` wrote)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return manifest


def _check_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    # A mismatch would surface as torch's raw "size mismatch for stem.0.weight": say what it means.
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    wrong = [f"{name} {got[name]} != {shape}" for name, shape in expected.items()
             if name in got and got[name] != shape]
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if wrong or missing or unexpected:
        detail = "; ".join(filter(None, [
            ("shapes differ: " + ", ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else "")) if wrong else "",
            ("missing: " + ", ".join(missing[:3])) if missing else "",
            ("unexpected: " + ", ".join(unexpected[:3])) if unexpected else "",
        ]))
        raise ConfigError(f"{origin} does not fit the model rebuilt from its plan ({detail}): "
                          "the base model or the pruned layers differ from the ones it was exported with")


def load_model_dir(folder: Path, *, cache_dir: Path, bundle: ModelBundle | None = None) -> nn.Module:
    """Rebuild the pruned model of an exported folder: the base model from the manifest's
    ``model_spec`` (or ``bundle``), pruned to the manifest's kept counts, with the stored weights.

    Raises:
        ConfigError: not an export, an export without a model spec, a base model that changed
            since the export, or weights that do not fit the rebuilt model.
        ModelLoadError: the plugin cannot be loaded.
    """
    manifest = read_manifest(folder)
    if bundle is None:
        spec = manifest.get("model_spec")
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"{folder / MANIFEST_FILE} names no model_spec (exported by an older hwprune): "
                              "pass the base model's bundle, or load the self-contained model.pt2")
        bundle = load_bundle(spec, cache_dir=cache_dir)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(f"{str(folder)!r} has no {STATE_FILE}")
    state = torch.load(state_path, weights_only=True)
    if state.get("base_fingerprint") != bundle.fingerprint():
        raise ConfigError(
            f"{state_path} was pruned from a different base model than {bundle.name!r} gives now "
            f"(fingerprint {str(state.get('base_fingerprint'))[:12]}, now {bundle.fingerprint()[:12]}): "
            "the plugin's weights or architecture changed since the export"
        )
    ignored = tuple(manifest.get("ignored_layers", ()))
    discovery = discover(bundle.model, bundle.example_input, ignored=ignored)
    kept = {str(k): int(v) for k, v in dict(manifest.get("kept", {})).items()}
    unknown = sorted(set(kept) - {g.name for g in discovery.groups})
    if unknown:
        raise ConfigError(f"{folder / MANIFEST_FILE}: group(s) {', '.join(unknown[:5])} are not in the base model")
    # Which channels go does not matter here (the stored weights replace them), only the shapes.
    pruned = apply_pruning(bundle.model, bundle.example_input, kept=kept, groups=discovery.groups, patterns={})
    _check_shapes(pruned.model, state["state_dict"], str(state_path))
    pruned.model.load_state_dict(state["state_dict"])
    return pruned.model.eval()


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
    _check_shapes(pruned.model, state["state_dict"], str(path))
    pruned.model.load_state_dict(state["state_dict"])
    return pruned.model.eval()


@dataclass(frozen=True)
class Rebuilt:
    """A stored trial's model rebuilt: ``finetune_steps`` counts every fine-tuning step run
    (the trial's recovery and any extra), ``recovery`` what each pass ran and kept."""

    plan: Plan
    pruned: PrunedModel
    artifact: OnnxArtifact
    finetune_steps: int
    recovery: list[dict[str, Any]]
    error: float | None


def rebuild_trial(
    *,
    bundle: ModelBundle,
    space: SearchSpace,
    config: SearchConfig,
    plan: Mapping[str, Any],
    artifact_sha256: str | None,
    base_signature: str,
    artifact_dir: Path,
    batch_size: int,
    finetune_steps: int = 0,
    device: ModelDevice = CPU,
) -> Rebuilt:
    """Re-create a stored trial's model from its plan, exactly as the trial built it (the one
    trial chain, ``search.pipeline.chain``, with the search's settings).

    The ONNX export must reproduce the trial's stored sha256 (before any extra
    ``finetune_steps``), which proves the model is the one that was measured. With
    ``finetune_steps`` the model is fine-tuned further (another seed) and scored again. ``device``
    is where its recovery runs: the kind of device the trial was recovered on
    (``search.pipeline.device.replay_device``).

    Raises:
        SearchError: the rebuilt model differs from the stored one.
    """
    # A re-made file is handed out (export) or served (confirmation): check its dynamic axes too.
    settings = ChainSettings.for_search(config, batch_size=batch_size, device=device, dynamic_check=True)
    chained = run_chain(bundle, space, Plan.from_dict(plan), settings, out=artifact_dir,
                        base_signature=base_signature, score=False)
    if chained.artifact is not None and artifact_sha256 and chained.artifact.sha256 != artifact_sha256:
        raise SearchError(
            f"the rebuilt model's ONNX ({chained.artifact.sha256[:12]}) differs from the measured one "
            f"({str(artifact_sha256)[:12]}): torch or torch-pruning versions may have changed since the search"
        )
    if finetune_steps > 0:
        chained = recover_further(chained, bundle, settings, finetune_steps, out=artifact_dir)
    if chained.plan is None or chained.pruned is None or chained.artifact is None:
        raise SearchError("the trial chain rebuilt no pruned model or ONNX file")  # a plan and a folder were given
    passes = [dict(p) for p in chained.recovery]
    return Rebuilt(chained.plan, chained.pruned, chained.artifact, sum(int(p["steps"]) for p in passes),
                   passes, chained.error)
