"""The ``trtexec`` latency backend: for devices with TensorRT's command-line tool and no Python
bindings (JetPack images). **Not yet run on a GPU by this project.**

Each measurement is one ``trtexec`` run with the profile's flags; the per-inference times it
exports (``--exportTimes``) feed the same statistics as every other backend. A paired
measurement alternates runs of candidate and reference and takes the median of the run ratios.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hardware_profiles import HardwareProfile
from latency_models.base import LatencyBackend, Measurement, PairedMeasurement, file_sha256
from latency_models.errors import ArtifactError, BackendUnavailable, MeasurementError, MeasurementTimeout
from latency_models.registry import register
from latency_models.stats import summarize
from latency_models.timing import Runner

PAIRED_ROUNDS = 5


def trtexec_command(binary: str, profile: HardwareProfile, onnx: Path, times: Path, *,
                    duration_s: float | None = None, timing_cache: Path | None = None) -> list[str]:
    """The trtexec invocation for one measurement of ``onnx`` on ``profile``."""
    options = profile.tensorrt
    command = [binary, f"--onnx={onnx}", f"--exportTimes={times}",
               f"--memPoolSize=workspace:{options.workspace_mib}M",
               f"--builderOptimizationLevel={options.builder_optimization_level}",
               f"--warmUp={int(round(profile.warmup.min_seconds * 1000))}",
               f"--duration={duration_s if duration_s is not None else profile.repeat.max_seconds:g}",
               f"--iterations={profile.repeat.min_runs}", "--avgRuns=1"]
    if profile.precision == "fp16":
        command.append("--fp16")
    elif profile.precision == "bf16":
        command.append("--bf16")
    elif profile.precision == "int8":
        command += ["--int8", "--fp16"]  # no calibration cache: trtexec sets dummy ranges
    command.append("--sparsity=enable" if "2:4" in profile.sparsity_patterns else "--sparsity=disable")
    if options.use_cuda_graph:
        command.append("--useCudaGraph")
    if options.no_data_transfers:
        command.append("--noDataTransfers")
    if timing_cache is not None:
        command.append(f"--timingCacheFile={timing_cache}")
    shapes = [f"{name}:{'x'.join(str(v) for v in dims)}" for name, dims in _input_shapes(onnx, profile)]
    if shapes:
        command.append(f"--shapes={','.join(shapes)}")
    return command


def _input_shapes(onnx: Path, profile: HardwareProfile) -> list[tuple[str, tuple[int, ...]]]:
    """Concrete shapes for inputs with dynamic dimensions (static inputs need none)."""
    import onnx as onnx_lib

    from latency_models.ort import example_shapes, resolve_shape

    try:
        model = onnx_lib.load(str(onnx), load_external_data=False)
    except Exception as exc:
        raise ArtifactError(f"{onnx.name} is not a valid ONNX model: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    recorded = example_shapes({entry.key: entry.value for entry in model.metadata_props})
    shapes = []
    for tensor in model.graph.input:
        if tensor.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor.type.tensor_type.shape.dim]
        if any(not isinstance(d, int) or d <= 0 for d in dims):
            shapes.append((tensor.name, resolve_shape(tensor.name, dims, profile, recorded.get(tensor.name))))
    return shapes


def parse_export_times(data: Any, *, transfers: bool) -> list[float]:
    """Per-inference durations in microseconds from trtexec's ``--exportTimes`` JSON.

    The file is a list of records in milliseconds; GPU compute time (``computeMs``) is used when
    data transfers are excluded, else ``latencyMs`` (transfers plus compute). Newer trtexec
    versions leave warm-up runs out of the file; older ones kept them and they count here too.

    Raises:
        MeasurementError: not a list of records with the expected key.
    """
    key = "latencyMs" if transfers else "computeMs"
    if not isinstance(data, list):
        raise MeasurementError("trtexec --exportTimes output is not a JSON list")
    values = [float(item[key]) * 1000.0 for item in data if isinstance(item, dict) and key in item]
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise MeasurementError(f"trtexec --exportTimes output has no valid {key!r} values")
    return values


@register("trtexec")
class TrtexecBackend(LatencyBackend):
    """Times whole trtexec runs; ``load`` is not used (trtexec times inside its own process)."""

    def __init__(self, profile: HardwareProfile, *, binary: str | None = None,
                 cache_dir: Path | None = None) -> None:
        super().__init__(profile)
        self._binary_name = binary or "trtexec"
        self.binary: str | None = None
        self.cache_dir = cache_dir or Path.home() / ".cache" / "hwprune" / "trtexec"
        self._version = "unknown"

    def open(self) -> None:
        found = shutil.which(self._binary_name) or (
            "/usr/src/tensorrt/bin/trtexec" if Path("/usr/src/tensorrt/bin/trtexec").is_file() else None)
        if found is None:
            raise BackendUnavailable(
                "backend 'trtexec' needs TensorRT's trtexec on PATH (JetPack: /usr/src/tensorrt/bin) "
                "and an NVIDIA GPU"
            )
        self.binary = found

    def version(self) -> str:
        return self._version

    def device(self) -> str:
        return "NVIDIA GPU (trtexec)"

    def load(self, artifact: Path) -> Runner:
        raise MeasurementError("the trtexec backend times whole trtexec runs; use measure()")

    def run_trtexec(self, onnx: Path) -> tuple[list[float], float]:
        """One trtexec run: per-inference durations (us) and the wall time it took."""
        if self.binary is None:
            self.open()
        if not onnx.is_file():
            raise ArtifactError(f"model file {str(onnx)!r} does not exist")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            times = Path(tmp) / "times.json"
            command = trtexec_command(str(self.binary), self.profile, onnx, times,
                                      timing_cache=self.cache_dir / f"timing-{self.profile.name}.cache")
            started = time.perf_counter()
            try:
                completed = subprocess.run(command, capture_output=True, text=True, timeout=self.profile.timeout_s)
            except subprocess.TimeoutExpired as exc:
                raise MeasurementTimeout(
                    f"trtexec took longer than the profile's timeout of {self.profile.timeout_s:g} s") from exc
            elapsed = time.perf_counter() - started
            if completed.returncode != 0:
                tail = (completed.stdout + completed.stderr).strip().splitlines()[-3:]
                raise MeasurementError(f"trtexec failed (exit {completed.returncode}): {' | '.join(tail)}")
            for line in completed.stdout.splitlines():
                if "TensorRT version:" in line:
                    self._version = line.split("TensorRT version:", 1)[1].strip()
            try:
                data = json.loads(times.read_text())
            except (OSError, ValueError) as exc:
                raise MeasurementError(f"trtexec wrote no readable --exportTimes file: {exc}") from exc
        return parse_export_times(data, transfers=not self.profile.tensorrt.no_data_transfers), elapsed

    def measure(self, artifact: Path) -> Measurement:
        sha = file_sha256(artifact)
        durations, elapsed = self.run_trtexec(artifact)
        return self._measurement(sha, tuple(durations), len(durations) >= self.profile.repeat.min_runs, elapsed)

    def measure_paired(self, candidate: Path, reference: Path) -> PairedMeasurement:
        cand_sha, ref_sha = file_sha256(candidate), file_sha256(reference)
        cand_all: list[float] = []
        ref_all: list[float] = []
        ratios: list[float] = []
        elapsed = 0.0
        for round_index in range(PAIRED_ROUNDS):
            order: Sequence[Path] = (candidate, reference) if round_index % 2 == 0 else (reference, candidate)
            medians = {}
            for path in order:
                durations, seconds = self.run_trtexec(path)
                elapsed += seconds
                medians[path] = summarize(durations).median
                (cand_all if path == candidate else ref_all).extend(durations)
            ratios.append(medians[candidate] / medians[reference])
        ratio = summarize(ratios)
        return PairedMeasurement(
            candidate=self._measurement(cand_sha, tuple(cand_all), True, elapsed),
            reference=self._measurement(ref_sha, tuple(ref_all), True, elapsed),
            ratio=ratio.median, ratio_ci_low=ratio.ci_low, ratio_ci_high=ratio.ci_high,
            n_pairs=len(ratios), converged=ratio.rel_halfwidth <= self.profile.repeat.target_rel_precision,
        )
