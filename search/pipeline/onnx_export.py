"""PyTorch model -> content-addressed ONNX artifact, checked against torch with ONNX Runtime.

Every export has a dynamic batch axis (and a dynamic sequence axis on token inputs), so the file
runs at any batch; it is traced and checked at the profile's batch size, and the example's other
dimensions are recorded in its metadata (``hwprune.example_shapes``) for backends to measure at
when a profile's ``dim_values`` does not name them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from search.errors import ExportError
from search.pipeline import inputs as model_inputs
from search.pipeline.inputs import ModelInput

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4
_TWO_GB = 2 * 1024**3
EXAMPLE_SHAPES_KEY = "hwprune.example_shapes"  # read by latency_models.ort.example_shapes


@dataclass(frozen=True, slots=True)
class OnnxArtifact:
    """An exported model stored as ``<sha256>.onnx``; equal bytes, equal name."""

    path: Path
    sha256: str
    size_bytes: int
    batch_size: int
    max_abs_diff: float


def batched(example: ModelInput, batch_size: int) -> ModelInput:
    """The example input repeated to ``batch_size`` along the first dimension."""
    return model_inputs.batched(example, batch_size)


class _ByName(nn.Module):
    """Takes the named inputs positionally, in ``names`` order, and calls the model by name."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))


def _export_bytes(
    model: nn.Module,
    example: ModelInput,
    *,
    names: Sequence[str],
    output_names: Sequence[str],
    axes: dict[str, dict[int, str]],
    dynamo: bool,
    opset: int | None,
) -> bytes | memoryview:
    args = tuple(model_inputs.tensors(example))
    if isinstance(example, dict):
        # The TorchScript exporter binds keyword inputs to the wrong parameters when a forward
        # has more of them (Hugging Face's use_cache, ...): export a positional front instead.
        # In eval mode: the exporter restores the wrapper's mode, recursively, after tracing.
        model = _ByName(model, list(example)).eval()
    if dynamo:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "model.onnx"
            with warnings.catch_warnings():
                # torch's own exporter trips torch's own deprecations (LeafSpec in 2.13).
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)
                program = torch.onnx.export(
                    model, args, dynamo=True, opset_version=opset,
                    external_data=False, verbose=False, input_names=list(names),
                    output_names=list(output_names), dynamic_axes=axes,
                )
            if program is None:
                raise ExportError("the dynamo exporter returned no program")
            program.save(str(target), external_data=False)
            return target.read_bytes()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy on every call; it is chosen on
        # purpose (0.1-0.7 s per model against 1.6-9 s for dynamo). Tracing Hugging Face code
        # warns about Python booleans taken from tensors; the batch check below catches any
        # shape that got baked in.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        torch.onnx.export(
            model,
            args,
            buffer,  # type: ignore[arg-type]  # file-like objects are accepted by the TorchScript exporter
            dynamo=False,
            opset_version=opset or 17,
            input_names=list(names),
            output_names=list(output_names),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return buffer.getbuffer()  # a view, not a copy: a BERT-base export is 440 MB


_METADATA_PROPS = 14  # ModelProto.metadata_props, a repeated StringStringEntryProto


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _top_level_fields(blob: bytes | memoryview) -> list[int] | None:
    """The field numbers of a serialized message, in order (None if it does not parse)."""
    fields, at = [], 0
    try:
        while at < len(blob):
            tag, at = _read_varint(blob, at)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                _, at = _read_varint(blob, at)
            elif wire == 2:
                length, at = _read_varint(blob, at)
                at += length
            else:
                return None  # ModelProto has no fixed-width fields
            fields.append(number)
    except IndexError:
        return None
    return fields if at == len(blob) else None


def _read_varint(blob: bytes | memoryview, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = blob[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if not byte & 0x80:
            return value, at


def _with_example_shapes(
    blob: bytes | memoryview, example: ModelInput, names: Sequence[str]
) -> tuple[bytes | memoryview, bytes]:
    """The export's bytes with the example shapes added, as (head, tail) to be written in turn."""
    shapes = {name: list(shape) for name, shape in zip(names, model_inputs.shapes(example), strict=True)}
    value = json.dumps(shapes, sort_keys=True)
    fields = _top_level_fields(blob)
    if fields is not None and max(fields, default=0) < _METADATA_PROPS:
        # Appending the entry gives the bytes parsing and serializing the model would (fields go
        # in number order, and the exporter writes none after metadata_props), without a second
        # copy of every weight through protobuf (nor through a concatenation: the caller hashes
        # and writes the two parts in turn). tests/search_tests/test_export.py compares both.
        entry = b"".join(_varint(n << 3 | 2) + _varint(len(v)) + v
                         for n, v in ((1, EXAMPLE_SHAPES_KEY.encode()), (2, value.encode())))
        return blob, _varint(_METADATA_PROPS << 3 | 2) + _varint(len(entry)) + entry
    proto = onnx.load_from_string(bytes(blob))
    added = proto.metadata_props.add()
    added.key, added.value = EXAMPLE_SHAPES_KEY, value
    return bytes(proto.SerializeToString()), b""


def export_onnx(
    model: nn.Module,
    example: ModelInput,
    out_dir: Path,
    *,
    batch_size: int = 1,
    dynamo: bool = False,
    opset: int | None = None,
    check: bool = True,
    dynamic_check: bool = False,
) -> OnnxArtifact:
    """Export ``model`` into ``out_dir/<sha256>.onnx`` with a dynamic batch axis.

    ``example`` is a tensor, a tuple of tensors or a mapping of named tensors (exported as inputs
    of those names). The model is traced at ``batch_size`` (the profile's). Weights are embedded
    (models over 2 GB are refused: they need external data). With ``check``, ONNX Runtime's
    outputs are compared to torch's within 1e-4 at the profile's shapes: what a trial needs to
    trust the file it measures. ``dynamic_check`` (for a file handed to the user) also runs
    ``onnx.checker`` and the file once more at another batch size, to prove the batch axis
    really is dynamic. Neither changes the file's bytes.

    Raises:
        ExportError: the exporter failed, the model is too large, or the outputs disagree.
    """
    model = model.eval()
    names, ordered = model_inputs.ordered(model, batched(example, batch_size))
    with torch.no_grad():
        expected = [t.detach() for t in model_inputs.flat_outputs(model_inputs.run(model, ordered))]
    if not expected:
        raise ExportError("the model returned no tensor to export")
    output_names = ["output", *(f"output_{i}" for i in range(1, len(expected)))]
    axes: dict[str, dict[int, str]] = model_inputs.dynamic_axes(names, ordered)
    for name, tensor in zip(output_names, expected, strict=True):
        if tensor.dim() and tensor.shape[0] == batch_size:
            axes[name] = {0: model_inputs.BATCH_AXIS}
    try:
        # Traced with gradients on: without them nn.MultiheadAttention takes its fused fast path
        # (aten::_native_multi_head_attention), which has no ONNX form.
        with torch.enable_grad():
            exported = _export_bytes(model, ordered, names=names, output_names=output_names, axes=axes,
                                     dynamo=dynamo, opset=opset)
        head, tail = _with_example_shapes(exported, ordered, names)
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed ({'dynamo' if dynamo else 'torchscript'}): {first}") from exc
    size = len(head) + len(tail)
    if size >= _TWO_GB:
        raise ExportError("the model is over 2 GB; hwprune embeds weights and cannot export it")
    digest = hashlib.sha256(head)
    digest.update(tail)
    sha = digest.hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{sha}.onnx"
    if not path.exists():
        partial = out_dir / f".{sha}.{os.getpid()}.tmp"
        with partial.open("wb") as out:
            out.write(head)
            out.write(tail)
        partial.replace(path)  # atomic: concurrent exporters of the same bytes agree
    diff = 0.0
    if dynamic_check:
        try:
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the export: {exc}") from exc
    if check or dynamic_check:
        diff = _compare_with_torch(ordered, names, expected, path, batch_size, other_batch=dynamic_check)
    return OnnxArtifact(path=path, sha256=sha, size_bytes=size, batch_size=batch_size,
                        max_abs_diff=diff)


def _compare_with_torch(
    inputs: ModelInput, names: Sequence[str], expected: Sequence[torch.Tensor], path: Path, batch_size: int,
    *, other_batch: bool = True,
) -> float:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    given = dict(zip(names, (t.numpy() for t in model_inputs.tensors(inputs)), strict=True))
    # The exporter drops inputs the graph never reads; feed every one it kept.
    feed = {node.name: given[node.name] for node in session.get_inputs()}
    got = session.run(None, feed)
    if len(got) != len(expected):
        raise ExportError(f"ONNX model has {len(got)} outputs, torch's {len(expected)}")
    diff = 0.0
    for index, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
        reference = theirs.numpy()
        if ours.shape != reference.shape:
            raise ExportError(f"ONNX output {index} shape {ours.shape} differs from torch's {reference.shape}")
        if not ours.size:
            continue
        gap = float(np.max(np.abs(ours.astype(np.float64) - reference.astype(np.float64))))
        scale = max(1.0, float(np.max(np.abs(reference))))
        if gap > TOLERANCE * scale:
            raise ExportError(f"ONNX output {index} differs from torch by {gap:.3g} (tolerance {TOLERANCE:g})")
        diff = max(diff, gap)
    if not other_batch:
        return diff
    # Every sample is the example repeated, so at another batch size each row must still match
    # row 0: a batch baked into the graph (``Got: 8 Expected: 1``) fails here, not on a device.
    other = batch_size + 1
    wider = {name: np.repeat(value[:1], other, axis=0) for name, value in feed.items()}
    try:
        again = session.run(None, wider)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the export does not run at batch {other}: {first}") from exc
    for index, (ours, theirs) in enumerate(zip(again, expected, strict=True)):
        if theirs.dim() == 0 or theirs.shape[0] != batch_size:
            continue
        reference = theirs.numpy()[:1]
        tolerance = TOLERANCE * max(1.0, float(np.max(np.abs(reference), initial=0.0)))
        if ours.shape[0] != other or not np.allclose(ours, reference, atol=tolerance):
            raise ExportError(f"ONNX output {index} at batch {other} does not repeat the batch-{batch_size} result: "
                              "a batch size is baked into the graph")
    return diff
