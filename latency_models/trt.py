"""TensorRT latency backend for NVIDIA GPUs (Ampere, Hopper) and Jetsons.

Written against the TensorRT 10 Python API and cuda-python's runtime bindings, both imported
lazily: without the ``tensorrt`` package or a CUDA device the backend refuses in one line.
**Not yet run on a GPU by this project**: ``hwprune doctor --gpu`` is the first check to run on
one. The engine is built from the ONNX file with the profile's precision (FP16; INT8 without
calibration data, ranges set as trtexec does for latency studies), ``SPARSE_WEIGHTS`` when the
profile offers 2:4, a workspace limit and a timing cache kept per profile, device and TensorRT
version. Inference is timed with CUDA events around ``execute_async_v3`` (or a CUDA graph
launch), inputs and outputs resident on the device unless the profile asks for transfers.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hardware_profiles import HardwareProfile
from latency_models.base import LatencyBackend
from latency_models.errors import ArtifactError, BackendUnavailable, MeasurementError
from latency_models.ort import ONNX_DTYPES, example_shapes, random_input, resolve_shape
from latency_models.registry import register
from latency_models.timing import Runner

logger = logging.getLogger(__name__)

_NEEDS = (
    "backend 'tensorrt' needs the tensorrt package and an NVIDIA GPU: "
    "pip install 'hwprune[tensorrt]' on a machine with CUDA, or measure through a remote agent"
)
INPUT_SEED = 0
# trtexec's --int8 without a calibration cache gives every tensor this range: the latency of the
# INT8 engine is real, its accuracy is not.
INT8_DUMMY_RANGE = 4.0


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


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or ``BackendUnavailable`` saying what is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable(_NEEDS + " (no tensorrt package here)")
    if cuda_device_count() == 0:
        raise BackendUnavailable(_NEEDS + " (no CUDA device here)")
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:  # e.g. libnvonnxparser.so missing from the wheel's libraries
        raise BackendUnavailable(f"{_NEEDS} (import tensorrt failed: {exc})") from exc


@dataclass(frozen=True, slots=True)
class BuildSettings:
    """What the builder config gets from a profile: flags by name, so tests can compare them."""

    flags: tuple[str, ...]
    workspace_bytes: int
    optimization_level: int
    int8_dummy_ranges: bool
    detailed_profiling: bool = True

    @classmethod
    def from_profile(cls, profile: HardwareProfile) -> BuildSettings:
        flags: list[str] = []
        if profile.precision == "fp16":
            flags.append("FP16")
        elif profile.precision == "bf16":
            flags.append("BF16")
        elif profile.precision == "int8":
            flags += ["INT8", "FP16"]  # FP16 fallback for layers without INT8 kernels
        if "2:4" in profile.sparsity_patterns:
            flags.append("SPARSE_WEIGHTS")
        return cls(
            flags=tuple(flags),
            workspace_bytes=profile.tensorrt.workspace_mib * 1024 * 1024,
            optimization_level=profile.tensorrt.builder_optimization_level,
            int8_dummy_ranges=profile.precision == "int8",
        )


@dataclass
class BuiltEngine:
    """A serialized engine and what the build reported."""

    plan: bytes
    timing_cache: bytes
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _recorded_shapes(onnx_bytes: bytes) -> dict[str, tuple[int, ...]]:
    """The exporter's example shapes from the ONNX metadata (none if the bytes do not parse)."""
    try:
        import onnx

        model = onnx.load_from_string(onnx_bytes)
    except Exception:  # a stand-in engine in tests may get bytes that are not ONNX
        return {}
    return example_shapes({entry.key: entry.value for entry in model.metadata_props})


def build_engine(trt: Any, onnx_bytes: bytes, profile: HardwareProfile, *,
                 timing_cache: bytes = b"") -> BuiltEngine:
    """Parse ONNX and build a serialized engine with the profile's settings.

    ``trt`` is the ``tensorrt`` module (or a stand-in with the same API, in tests).

    Raises:
        ArtifactError: the ONNX parser rejected the model (its messages included).
        MeasurementError: the builder produced no engine.
    """
    settings = BuildSettings.from_profile(profile)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT's ONNX parser rejected the model: {errors or 'no details'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    if settings.detailed_profiling:
        # Tactic names in the engine inspector tell which layers got sparse kernels.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in settings.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)
    shapes: dict[str, tuple[int, ...]] = {}
    recorded = _recorded_shapes(onnx_bytes)
    optimization_profile = None
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dims = tuple(int(d) for d in tensor.shape)
        resolved = resolve_shape(tensor.name, [d if d > 0 else None for d in dims], profile,
                                 recorded.get(tensor.name))
        shapes[tensor.name] = resolved
        if any(d < 0 for d in dims):
            if optimization_profile is None:
                optimization_profile = builder.create_optimization_profile()
            optimization_profile.set_shape(tensor.name, resolved, resolved, resolved)
    if optimization_profile is not None:
        config.add_optimization_profile(optimization_profile)
    if settings.int8_dummy_ranges:
        _set_dummy_ranges(network)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MeasurementError(f"TensorRT could not build an engine for profile {profile.name!r}")
    return BuiltEngine(plan=bytes(serialized), timing_cache=bytes(cache.serialize()), input_shapes=shapes)


def _set_dummy_ranges(network: Any) -> None:
    for index in range(network.num_inputs):
        network.get_input(index).set_dynamic_range(-INT8_DUMMY_RANGE, INT8_DUMMY_RANGE)
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        for output in range(layer.num_outputs):
            layer.get_output(output).set_dynamic_range(-INT8_DUMMY_RANGE, INT8_DUMMY_RANGE)


def sparse_layers(engine_information: str) -> list[str]:
    """Layers whose chosen tactic is a sparse kernel, from the inspector's JSON."""
    try:
        info = json.loads(engine_information)
    except ValueError:
        return []
    found = []
    for layer in info.get("Layers", []):
        if isinstance(layer, dict) and "sparse" in str(layer.get("TacticName", "")).lower():
            found.append(str(layer.get("Name", "?")))
    return found


def timing_cache_path(cache_dir: Path, profile: HardwareProfile, device: str, version: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "gpu"
    return cache_dir / f"timing-{profile.name}-{slug}-trt{version}.cache"


class _Cuda:
    """The few CUDA runtime calls the timer needs, through cuda-python."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
            except ImportError as exc:
                raise BackendUnavailable(
                    "backend 'tensorrt' needs cuda-python for device memory and CUDA events: "
                    "pip install 'hwprune[tensorrt]'"
                ) from exc
        self.rt = cudart

    def check(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise MeasurementError(f"CUDA call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    def device_name(self) -> str:
        props = self.check(self.rt.cudaGetDeviceProperties(0))
        name = props.name
        return name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)


@register("tensorrt")
class TensorRTBackend(LatencyBackend):
    """TensorRT engines built from the ONNX artifact, timed with CUDA events."""

    def __init__(self, profile: HardwareProfile, *, cache_dir: Path | None = None) -> None:
        super().__init__(profile)
        self.cache_dir = cache_dir or Path.home() / ".cache" / "hwprune" / "tensorrt"
        self._trt: Any = None
        self._cuda: _Cuda | None = None
        self._runtime: Any = None
        self._device = ""
        self._keep: list[Any] = []
        self.sparse_report: dict[str, list[str]] = {}

    def open(self) -> None:
        self._trt = require_tensorrt()
        self._cuda = _Cuda()
        self._device = self._cuda.device_name()
        self._runtime = self._trt.Runtime(self._trt.Logger(self._trt.Logger.WARNING))

    def close(self) -> None:
        if self._cuda is not None:
            for pointer in self._keep:
                if isinstance(pointer, int):
                    self._cuda.rt.cudaFree(pointer)
        self._keep.clear()

    def version(self) -> str:
        return str(getattr(self._trt, "__version__", "unknown"))

    def device(self) -> str:
        return self._device or "unopened"

    def _engine(self, artifact: Path) -> tuple[Any, dict[str, tuple[int, ...]]]:
        onnx_bytes = artifact.read_bytes()
        key = hashlib.sha256(onnx_bytes + self.profile.fingerprint().encode()).hexdigest()[:24]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = timing_cache_path(self.cache_dir, self.profile, self._device, self.version())
        timing = cache_file.read_bytes() if cache_file.is_file() else b""
        built = build_engine(self._trt, onnx_bytes, self.profile, timing_cache=timing)
        cache_file.write_bytes(built.timing_cache)  # repeated builds on this device reuse tactics
        engine = self._runtime.deserialize_cuda_engine(built.plan)
        if engine is None:
            raise MeasurementError(f"TensorRT could not deserialize the engine of {artifact.name}")
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(self._trt.LayerInformationFormat.JSON)
        self.sparse_report[key] = sparse_layers(info)
        return engine, built.input_shapes

    def load(self, artifact: Path) -> Runner:
        if self._trt is None or self._cuda is None:
            self.open()
        assert self._cuda is not None  # for mypy: open() set it or raised
        cuda, trt = self._cuda, self._trt
        if not artifact.is_file():
            raise ArtifactError(f"model file {str(artifact)!r} does not exist")
        engine, shapes = self._engine(artifact)
        context = engine.create_execution_context()
        stream = cuda.check(cuda.rt.cudaStreamCreate())
        rng = np.random.default_rng(INPUT_SEED)
        copies: list[tuple[int, Any]] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and name in shapes:
                context.set_input_shape(name, shapes[name])
            shape = tuple(context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host = (random_input(shape, _onnx_type(dtype), rng) if is_input
                    else np.zeros(shape, dtype=dtype))
            pointer = cuda.check(cuda.rt.cudaMalloc(max(1, host.nbytes)))
            self._keep.append(pointer)
            if is_input:
                cuda.check(cuda.rt.cudaMemcpy(pointer, host.ctypes.data, host.nbytes,
                                              cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
                copies.append((pointer, host))
            context.set_tensor_address(name, pointer)
        transfers = not self.profile.tensorrt.no_data_transfers
        start, end = cuda.check(cuda.rt.cudaEventCreate()), cuda.check(cuda.rt.cudaEventCreate())

        def enqueue() -> None:
            if transfers:
                for pointer, host in copies:
                    cuda.check(cuda.rt.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes,
                                                       cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
            if not context.execute_async_v3(int(stream)):
                raise MeasurementError(f"TensorRT failed to run {artifact.name}")

        enqueue()
        cuda.check(cuda.rt.cudaStreamSynchronize(stream))
        graph_exec = None
        if self.profile.tensorrt.use_cuda_graph:
            cuda.check(cuda.rt.cudaStreamBeginCapture(
                stream, cuda.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
            enqueue()
            graph = cuda.check(cuda.rt.cudaStreamEndCapture(stream))
            graph_exec = cuda.check(cuda.rt.cudaGraphInstantiate(graph, 0))
        self._keep.extend([context, engine, stream, start, end, graph_exec])

        def run() -> int:
            cuda.check(cuda.rt.cudaEventRecord(start, stream))
            if graph_exec is not None:
                cuda.check(cuda.rt.cudaGraphLaunch(graph_exec, stream))
            else:
                enqueue()
            cuda.check(cuda.rt.cudaEventRecord(end, stream))
            cuda.check(cuda.rt.cudaEventSynchronize(end))
            elapsed_ms = cuda.check(cuda.rt.cudaEventElapsedTime(start, end))
            return int(float(elapsed_ms) * 1_000_000)

        return run


def _onnx_type(dtype: np.dtype[Any]) -> str:
    """The ONNX type name ``random_input`` takes for a numpy dtype (ONNX Runtime's own table)."""
    names = {np.dtype(numpy_type).name: onnx_type for onnx_type, numpy_type in ONNX_DTYPES.items()}
    return names.get(dtype.name, "tensor(float)")
