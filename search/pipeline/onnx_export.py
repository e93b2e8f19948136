"""PyTorch model -> content-addressed ONNX artifact, checked by onnx.checker and against torch."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from search.errors import ExportError

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4
_TWO_GB = 2 * 1024**3


@dataclass(frozen=True, slots=True)
class OnnxArtifact:
    """An exported model stored as ``<sha256>.onnx``; equal bytes, equal name."""

    path: Path
    sha256: str
    size_bytes: int
    batch_size: int
    max_abs_diff: float


def batched(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The example input repeated to ``batch_size`` along the first dimension."""
    return example[:1].expand(batch_size, *example.shape[1:]).contiguous()


def _export_bytes(model: nn.Module, example: torch.Tensor, *, dynamo: bool, opset: int | None) -> bytes:
    if dynamo:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "model.onnx"
            with warnings.catch_warnings():
                # torch's own exporter trips torch's own deprecations (LeafSpec in 2.13).
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                program = torch.onnx.export(
                    model, (example,), dynamo=True, opset_version=opset, external_data=False,
                    verbose=False,
                )
            if program is None:
                raise ExportError("the dynamo exporter returned no program")
            program.save(str(target), external_data=False)
            return target.read_bytes()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy on every call; it is chosen on
        # purpose (0.1-0.7 s per model against 1.6-9 s for dynamo).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]  # file-like objects are accepted by the TorchScript exporter
            dynamo=False,
            opset_version=opset or 17,
            input_names=["input"],
            output_names=["output"],
            do_constant_folding=True,
        )
    return buffer.getvalue()


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    out_dir: Path,
    *,
    batch_size: int = 1,
    dynamo: bool = False,
    opset: int | None = None,
    check: bool = True,
) -> OnnxArtifact:
    """Export ``model`` at ``batch_size`` into ``out_dir/<sha256>.onnx``.

    Weights are embedded (models over 2 GB are refused: they need external data). With
    ``check``, ``onnx.checker`` validates the graph and ONNX Runtime's output is compared to
    torch's within 1e-4.

    Raises:
        ExportError: the exporter failed, the model is too large, or the outputs disagree.
    """
    model = model.eval()
    inputs = batched(example, batch_size)
    try:
        with torch.no_grad():
            blob = _export_bytes(model, inputs, dynamo=dynamo, opset=opset)
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed ({'dynamo' if dynamo else 'torchscript'}): {first}") from exc
    if len(blob) >= _TWO_GB:
        raise ExportError("the model is over 2 GB; hwprune embeds weights and cannot export it")
    sha = hashlib.sha256(blob).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{sha}.onnx"
    if not path.exists():
        partial = out_dir / f".{sha}.{os.getpid()}.tmp"
        partial.write_bytes(blob)
        partial.replace(path)  # atomic: concurrent exporters of the same bytes agree
    diff = 0.0
    if check:
        try:
            onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the export: {exc}") from exc
        diff = _compare_with_torch(model, inputs, path)
    return OnnxArtifact(path=path, sha256=sha, size_bytes=len(blob), batch_size=batch_size,
                        max_abs_diff=diff)


def _compare_with_torch(model: nn.Module, inputs: torch.Tensor, path: Path) -> float:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: inputs.numpy()}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        expected = model(inputs).numpy()
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from torch's {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    if diff > TOLERANCE * scale:
        raise ExportError(f"ONNX output differs from torch by {diff:.3g} (tolerance {TOLERANCE:g})")
    return diff
