"""ONNX Runtime latency backend: CPU by default, any execution provider the profile names."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hardware_profiles import HardwareProfile
from latency_models.base import LatencyBackend, cpu_name
from latency_models.errors import ArtifactError, BackendUnavailable, MeasurementError
from latency_models.registry import register
from latency_models.timing import Runner

INPUT_SEED = 0
EXAMPLE_SHAPES_KEY = "hwprune.example_shapes"  # written by hwprune's exporter

ONNX_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def example_shapes(metadata: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """The example input shapes an exporter recorded in the model's metadata, by input name.

    hwprune's exporter marks batch and sequence axes dynamic and records the shapes it traced at,
    so a profile without ``dim_values`` still measures at the model's own sequence length.
    Missing or malformed metadata gives no shapes.
    """
    try:
        recorded = json.loads(metadata.get(EXAMPLE_SHAPES_KEY, "{}"))
        return {str(name): tuple(int(d) for d in dims) for name, dims in recorded.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def resolve_shape(
    input_name: str,
    shape: Sequence[int | str | None],
    profile: HardwareProfile,
    example: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Concrete dimensions for one model input.

    A symbolic first dimension is the profile's batch size; any other symbolic dimension is the
    profile's ``dim_values`` entry of its name, else the ``example`` shape's (the exporter's).

    Raises:
        ArtifactError: a dynamic dimension neither the profile nor the example resolves.
    """
    dims: list[int] = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif isinstance(dim, str) and dim in profile.dim_values:
            dims.append(profile.dim_values[dim])
        elif axis == 0:
            dims.append(profile.batch_size)
        elif example is not None and axis < len(example) and example[axis] > 0:
            dims.append(int(example[axis]))
        else:
            label = repr(dim) if dim else "unnamed"
            raise ArtifactError(
                f"input {input_name!r} has a dynamic dimension {label} at axis {axis}; "
                f"set dim_values: {{{dim or 'name'}: N}} in profile {profile.name!r}"
            )
    return tuple(dims)


def random_input(shape: tuple[int, ...], onnx_type: str, rng: np.random.Generator) -> Any:
    """Seeded input of one type: normal floats; integers in [0, 2) so any index is valid."""
    try:
        dtype = ONNX_DTYPES[onnx_type]
    except KeyError:
        raise ArtifactError(
            f"input type {onnx_type} is not supported; supported: {', '.join(ONNX_DTYPES)}"
        ) from None
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype is np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 2, shape).astype(dtype)


@register("onnxruntime")
class OnnxRuntimeBackend(LatencyBackend):
    """Times ``InferenceSession.run`` with the host's monotonic clock around each call."""

    _ort: Any = None

    def open(self) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendUnavailable(
                "backend 'onnxruntime' needs onnxruntime: pip install onnxruntime"
            ) from exc
        provider = self.profile.execution_provider
        available = onnxruntime.get_available_providers()
        if provider not in available:
            raise BackendUnavailable(
                f"profile {self.profile.name!r} asks for ONNX Runtime's {provider}, which this "
                f"installation lacks; available: {', '.join(available)}"
            )
        self._ort = onnxruntime

    def _runtime(self) -> Any:
        if self._ort is None:
            self.open()
        return self._ort

    def version(self) -> str:
        return str(self._runtime().__version__)

    def device(self) -> str:
        provider = self.profile.execution_provider
        if provider == "CPUExecutionProvider":
            return cpu_name()
        return f"{provider} on {cpu_name()}"

    def session_options(self) -> Any:
        ort = self._runtime()
        options = ort.SessionOptions()
        if self.profile.threads is not None:
            options.intra_op_num_threads = self.profile.threads
        # One model, one stream: operator-level parallelism only adds scheduling noise.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[self.profile.graph_optimization]
        )
        options.log_severity_level = 3
        return options

    def load(self, artifact: Path) -> Runner:
        ort = self._runtime()
        if not artifact.is_file():
            raise ArtifactError(f"model file {str(artifact)!r} does not exist")
        providers = [(self.profile.execution_provider, dict(self.profile.provider_options))]
        try:
            session = ort.InferenceSession(str(artifact), self.session_options(), providers=providers)
        except Exception as exc:  # ORT raises its own pybind types, not a common base
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(
                f"ONNX Runtime cannot load {artifact.name}: {first_line}"
            ) from exc
        rng = np.random.default_rng(INPUT_SEED)
        recorded = example_shapes(session.get_modelmeta().custom_metadata_map)
        feeds = {
            node.name: random_input(
                resolve_shape(node.name, node.shape, self.profile, recorded.get(node.name)), node.type, rng
            )
            for node in session.get_inputs()
        }
        outputs = [node.name for node in session.get_outputs()]
        try:
            session.run(outputs, feeds)
        except Exception as exc:
            raise MeasurementError(f"ONNX Runtime failed to run {artifact.name}: {exc}") from exc

        def run() -> int:
            start = time.perf_counter_ns()
            session.run(outputs, feeds)
            return time.perf_counter_ns() - start

        return run
