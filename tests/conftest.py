"""Shared fixtures: small models built in code and exported to real ONNX files."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any
from pathlib import Path

import pytest
import torch
from torch import nn

from hardware_profiles import HardwareProfile, load_profile_file


def export_model(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export with the TorchScript exporter (fast) and a dynamic batch dimension."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return path


def tiny_convnet(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def onnx_artifact(onnx_dir: Path) -> Path:
    """A small CNN (16 channels, 32x32 input) exported to ONNX."""
    return export_model(tiny_convnet(16), torch.randn(1, 3, 32, 32), onnx_dir / "tiny16.onnx")


@pytest.fixture(scope="session")
def onnx_artifact_wide(onnx_dir: Path) -> Path:
    """The same CNN four times as wide: clearly slower than ``onnx_artifact``."""
    return export_model(tiny_convnet(64), torch.randn(1, 3, 32, 32), onnx_dir / "tiny64.onnx")


@pytest.fixture
def write_profile(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a YAML profile into a fresh folder and return its path."""
    folder = tmp_path / "profiles"
    folder.mkdir(exist_ok=True)

    def write(name: str, text: str) -> Path:
        path = folder / f"{name}.yaml"
        path.write_text(text)
        return path

    return write


FAST_PROFILE = """\
backend: onnxruntime
device_class: cpu
threads: 1
warmup: {runs: 2, min_seconds: 0}
repeat: {min_runs: 10, max_runs: 200, max_seconds: 0.3, check_every: 5, target_rel_precision: 0.05}
channel_multiple: 8
"""


@pytest.fixture
def fast_profile_path(write_profile: Callable[[str, str], Path]) -> Path:
    """A local ONNX Runtime profile with short warm-up and timing, for tests."""
    return write_profile("fast", FAST_PROFILE)


@pytest.fixture
def fast_profile(fast_profile_path: Path) -> HardwareProfile:
    return load_profile_file(fast_profile_path)


@pytest.fixture(scope="session")
def hwprune_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder shared by the session: the digits example trains once per test run."""
    return tmp_path_factory.mktemp("hwprune-cache")


@pytest.fixture(scope="session")
def digits_bundle(hwprune_cache: Path) -> Any:
    from search.examples import digits

    return digits(cache_dir=hwprune_cache)
