from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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


def test_weights_embedded_and_batch_from_profile(build_architecture: Factory, tmp_path: Path) -> None:
    model, example = build_architecture("mobilenetv2", 0)
    artifact = export_onnx(model, example, tmp_path, batch_size=4)
    graph = onnx.load(str(artifact.path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
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
    with pytest.raises(ExportError, match="ONNX export failed|differs from torch"):
        export_onnx(_Unexportable(), torch.randn(1, 4), tmp_path)
