from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

from search.errors import ExportError
from search.pipeline.onnx_export import export_onnx

Factory = Callable[[str, int], tuple[nn.Module, torch.Tensor]]


def test_content_addressed_and_repeatable(build_architecture: Factory, tmp_path: Path) -> None:
    model, example = build_architecture("resnet18", 0)
    first = export_onnx(model, example, tmp_path)
    second = export_onnx(model, example, tmp_path)
    assert first.path == second.path == tmp_path / f"{first.sha256}.onnx"
    assert first.size_bytes == first.path.stat().st_size
    assert list(tmp_path.iterdir()) == [first.path]  # no partial files left behind
    other, _ = build_architecture("resnet18", 1)
    assert export_onnx(other, example, tmp_path).sha256 != first.sha256


def test_weights_embedded_and_batch_dynamic(build_architecture: Factory, tmp_path: Path) -> None:
    model, example = build_architecture("mobilenetv2", 0)
    artifact = export_onnx(model, example, tmp_path, batch_size=4)
    graph = onnx.load(str(artifact.path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == list(example.shape[1:])
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)
    assert list(tmp_path.glob("*.data")) == []
    assert artifact.max_abs_diff <= 1e-4


def test_dynamo_exporter_on_request(build_architecture: Factory, tmp_path: Path) -> None:
    model, example = build_architecture("transformer", 0)
    artifact = export_onnx(model, example, tmp_path, dynamo=True)
    assert artifact.max_abs_diff <= 1e-4
    assert list(tmp_path.glob("*.data")) == []


class _Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy() * 2)  # leaves torch: the tracer cannot follow it


def test_export_failure_is_an_export_error(tmp_path: Path) -> None:
    # The base model's export at a search's start and a file handed out take the full check.
    with pytest.raises(ExportError, match="ONNX export failed|differs from torch|baked into the graph"):
        export_onnx(_Unexportable(), torch.randn(1, 4), tmp_path, dynamic_check=True)


def test_any_batch_runs_and_is_measured_at_the_profile_batch(
    build_architecture: Factory, tmp_path: Path, write_profile: Callable[[str, str], Path]
) -> None:
    """Issue 13 item 9: an export at batch 1 runs at batch 8 (no ``Got: 8 Expected: 1``), and
    ONNX Runtime times it at the profile's batch size."""
    import onnxruntime

    from hardware_profiles import load_profile_file
    from latency_models.ort import OnnxRuntimeBackend

    model, example = build_architecture("resnet18", 0)
    artifact = export_onnx(model, example, tmp_path)
    session = onnxruntime.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    eight = example[:1].expand(8, *example.shape[1:]).contiguous()
    (got,) = session.run(None, {"input": eight.numpy()})
    with torch.no_grad():
        assert got.shape[0] == 8 and float(abs(got - model(eight).numpy()).max()) < 1e-4
    profile = load_profile_file(write_profile("batch8", FAST_PROFILE_BATCH8))
    fed: list[tuple[int, ...]] = []
    backend = OnnxRuntimeBackend(profile)
    original = onnxruntime.InferenceSession.run

    def spy(self: Any, outputs: Any, feeds: dict[str, Any], *args: Any) -> Any:
        fed.extend(tuple(v.shape) for v in feeds.values())
        return original(self, outputs, feeds, *args)

    onnxruntime.InferenceSession.run = spy  # type: ignore[method-assign]
    try:
        backend.load(artifact.path)()
    finally:
        onnxruntime.InferenceSession.run = original  # type: ignore[method-assign]
    assert fed and all(shape[0] == 8 for shape in fed)


FAST_PROFILE_BATCH8 = """\
backend: onnxruntime
device_class: cpu
threads: 1
batch_size: 8
warmup: {runs: 1, min_seconds: 0}
repeat: {min_runs: 5, max_runs: 10, max_seconds: 0.3, check_every: 5, target_rel_precision: 0.05}
"""


class _BakedBatch(nn.Module):
    """Flattens to one row: traced at batch 1, the graph cannot run at batch 2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.fc(x.reshape(1, 8))
        return result


def test_the_batch_axis_is_checked_for_a_file_handed_out_not_per_trial(tmp_path: Path) -> None:
    model, example = _BakedBatch().eval(), torch.randn(1, 8)
    trial = export_onnx(model, example, tmp_path)  # a trial's check: ORT agrees at the profile's shapes
    assert trial.max_abs_diff <= 1e-4
    with pytest.raises(ExportError, match="batch 2"):
        export_onnx(model, example, tmp_path, dynamic_check=True)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Exporting aten.{2}index operator:UserWarning")
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "transformer", "llama"])
def test_example_shapes_appended_as_protobuf_would_write_them(
    build_architecture: Factory, name: str, tmp_path: Path
) -> None:
    from search.pipeline.onnx_export import EXAMPLE_SHAPES_KEY

    model, example = build_architecture(name, 0)
    artifact = export_onnx(model, example, tmp_path, check=False)
    proto = onnx.load(str(artifact.path))
    entry = proto.metadata_props.pop()
    assert entry.key == EXAMPLE_SHAPES_KEY
    # What the export wrote before the entry was appended to the bytes: parse, add, serialize.
    again = onnx.load_from_string(proto.SerializeToString())
    added = again.metadata_props.add()
    added.key, added.value = entry.key, entry.value
    assert again.SerializeToString() == artifact.path.read_bytes()
