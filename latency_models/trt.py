"""TensorRT latency backend (NVIDIA GPUs, Jetson).

TODO(hwprune): engine build and CUDA-event timing land with the TensorRT issue; until then the
backend registers, checks for the package and a GPU, and refuses clearly.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

from latency_models.base import LatencyBackend
from latency_models.errors import BackendUnavailable
from latency_models.registry import register
from latency_models.timing import Runner

_NEEDS = (
    "backend 'tensorrt' needs the tensorrt package and an NVIDIA GPU: "
    "pip install 'hwprune[tensorrt]' on a machine with CUDA, or measure through a remote agent"
)


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports; 0 where there is no driver."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        if cuda.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


@register("tensorrt")
class TensorRTBackend(LatencyBackend):
    """TensorRT engines built from the ONNX artifact with the profile's precision."""

    def open(self) -> None:
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendUnavailable(_NEEDS + " (no tensorrt package here)")
        if cuda_device_count() == 0:
            raise BackendUnavailable(_NEEDS + " (no CUDA device here)")
        raise BackendUnavailable(
            "backend 'tensorrt' is not implemented in this hwprune release; "
            "measure with an onnxruntime profile meanwhile"
        )

    def version(self) -> str:
        return "unavailable"

    def device(self) -> str:
        return "unavailable"

    def load(self, artifact: Path) -> Runner:
        self.open()
        raise AssertionError("unreachable: open() refuses")
