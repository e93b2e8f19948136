"""Contract tests for every registered backend, and the ONNX Runtime backend on real sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from hardware_profiles import HardwareProfile, load_profile
from latency_models import (
    ArtifactError,
    BackendUnavailable,
    LatencyBackend,
    RegistryError,
    UnknownBackendError,
    registry,
)
from latency_models.ort import resolve_shape
from latency_models.trt import cuda_device_count

# The Python library each backend's open() imports (trtexec runs a program instead).
LIBRARY = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "trtexec": None}


def _profile_for(backend: str) -> HardwareProfile:
    for name in ("cpu-ort-fp32", "ampere-trt-fp16"):
        profile = load_profile(name)
        if profile.backend == backend:
            return profile
    # Backends no shipped profile names (trtexec): a TensorRT profile pointed at them.
    return load_profile("ampere-trt-fp16").model_copy(update={"backend": backend})


def _runs_here(backend: str) -> str | None:
    """None when ``backend`` can run on this machine, else the reason it cannot."""
    try:
        with registry.get(backend)(_profile_for(backend)):
            return None
    except BackendUnavailable as exc:
        return str(exc)


@pytest.mark.parametrize("name", registry.names())
class TestBackendContract:
    def test_registered_under_its_name(self, name: str) -> None:
        cls = registry.get(name)
        assert issubclass(cls, LatencyBackend)
        assert cls.name == name

    def test_construction_imports_nothing_and_needs_open(self, name: str) -> None:
        # In a fresh interpreter: constructing the backend loads no module at all; open() is what
        # imports its library (or refuses in one line naming what to install).
        code = (
            "import json, sys\n"
            "from hardware_profiles import HardwareProfile\n"
            "from latency_models import BackendUnavailable, registry\n"
            f"profile = HardwareProfile.model_validate_json({_profile_for(name).model_dump_json()!r})\n"
            "before = set(sys.modules)\n"
            f"backend = registry.get({name!r})(profile)\n"
            "constructed = sorted(set(sys.modules) - before)\n"
            "try:\n"
            "    backend.open()\n"
            "    refused = None\n"
            "except BackendUnavailable as exc:\n"
            "    refused = str(exc)\n"
            "print(json.dumps({'constructed': constructed, 'opened': sorted(set(sys.modules) - before),"
            " 'refused': refused}))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        seen = json.loads(out.stdout)
        assert seen["constructed"] == []
        if seen["refused"] is not None:
            assert "\n" not in seen["refused"] and name in seen["refused"]
        elif LIBRARY[name] is not None:
            assert LIBRARY[name] in seen["opened"]

    def test_measures_a_real_model_or_refuses_in_one_line(
        self, name: str, onnx_artifact: Path
    ) -> None:
        reason = _runs_here(name)
        if reason is not None:
            assert "\n" not in reason and name in reason
            pytest.skip(f"requires_gpu: {reason}")
        profile = _profile_for(name).model_copy(
            update={"repeat": _profile_for(name).repeat.model_copy(update={"max_seconds": 0.3})}
        )
        with registry.get(name)(profile) as backend:
            result = backend.measure(onnx_artifact)
        assert result.n >= profile.repeat.min_runs
        assert 0 < result.p10_us <= result.median_us <= result.p90_us
        assert result.ci_low_us <= result.median_us <= result.ci_high_us
        assert result.backend == name and result.profile == profile.name


def test_unknown_backend_lists_known() -> None:
    with pytest.raises(UnknownBackendError, match=r"no latency backend 'tvm'; known: onnxruntime, tensorrt, trtexec"):
        registry.get("tvm")


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(RegistryError, match="'onnxruntime' registered twice"):

        @registry.register("onnxruntime")
        class Again(LatencyBackend):  # pragma: no cover - never instantiated
            pass


@pytest.mark.skipif(cuda_device_count() > 0, reason="a CUDA device is present")
def test_tensorrt_refuses_without_gpu_in_one_line() -> None:
    with pytest.raises(BackendUnavailable, match="needs the tensorrt package and an NVIDIA GPU"):
        with registry.get("tensorrt")(load_profile("ampere-trt-fp16")):
            pass


def test_ort_measurement_fields(fast_profile: HardwareProfile, onnx_artifact: Path) -> None:
    with registry.get("onnxruntime")(fast_profile) as backend:
        m = backend.measure(onnx_artifact)
    assert m.backend_version == onnxruntime.__version__
    assert m.threads == 1
    assert "x" in m.device
    assert len(m.artifact_sha256) == 64
    assert m.stdev_us >= 0 and m.mean_us > 0
    assert m.n <= fast_profile.repeat.max_runs


def test_ort_larger_model_is_slower(
    fast_profile: HardwareProfile, onnx_artifact: Path, onnx_artifact_wide: Path
) -> None:
    with registry.get("onnxruntime")(fast_profile) as backend:
        paired = backend.measure_paired(onnx_artifact_wide, onnx_artifact)
    # 4x the channels is ~16x the MACs of the middle conv: far above any noise.
    assert paired.ratio > 2.0
    assert paired.ratio_ci_low <= paired.ratio <= paired.ratio_ci_high
    assert paired.candidate.median_us > paired.reference.median_us
    assert paired.n_pairs == paired.candidate.n == paired.reference.n


def test_ort_adaptive_stopping_stops_early_when_precise(
    fast_profile: HardwareProfile, onnx_artifact: Path
) -> None:
    loose = fast_profile.model_copy(
        update={
            "repeat": fast_profile.repeat.model_copy(
                update={"target_rel_precision": 0.5, "max_runs": 100_000, "max_seconds": 30.0}
            )
        }
    )
    with registry.get("onnxruntime")(loose) as backend:
        m = backend.measure(onnx_artifact)
    assert m.converged
    # Stopped at one of the first checks, far below the caps (a loaded machine may need a few).
    assert loose.repeat.min_runs <= m.n <= 200
    assert m.elapsed_s < 30.0


def test_ort_time_cap_reports_not_converged(
    fast_profile: HardwareProfile, onnx_artifact: Path
) -> None:
    strict = fast_profile.model_copy(
        update={
            "repeat": fast_profile.repeat.model_copy(
                update={"target_rel_precision": 1e-9, "max_runs": 40, "max_seconds": 30.0}
            )
        }
    )
    with registry.get("onnxruntime")(strict) as backend:
        m = backend.measure(onnx_artifact)
    assert not m.converged
    assert m.n == 40


def test_ort_missing_model(fast_profile: HardwareProfile, tmp_path: Path) -> None:
    with registry.get("onnxruntime")(fast_profile) as backend:
        with pytest.raises(ArtifactError, match="does not exist"):
            backend.measure(tmp_path / "absent.onnx")


def test_ort_invalid_model(fast_profile: HardwareProfile, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with registry.get("onnxruntime")(fast_profile) as backend:
        with pytest.raises(ArtifactError, match="ONNX Runtime cannot load bad.onnx"):
            backend.measure(bad)


def test_ort_unavailable_provider(fast_profile: HardwareProfile) -> None:
    profile = fast_profile.model_copy(update={"execution_provider": "CUDAExecutionProvider"})
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider, which this installation lacks"):
        with registry.get("onnxruntime")(profile):
            pass


def test_dynamic_dims_resolved_from_profile(fast_profile: HardwareProfile) -> None:
    profile = fast_profile.model_copy(update={"batch_size": 4, "dim_values": {"seq": 128}})
    assert resolve_shape("x", ["batch", "seq", 64], profile) == (4, 128, 64)
    with pytest.raises(ArtifactError, match=r"dynamic dimension 'tokens' at axis 1; set dim_values"):
        resolve_shape("x", ["batch", "tokens"], profile)


def test_batch_from_profile_reaches_the_session(
    fast_profile: HardwareProfile, onnx_artifact: Path
) -> None:
    batch8 = fast_profile.model_copy(update={"batch_size": 8})
    with registry.get("onnxruntime")(fast_profile) as b1, registry.get("onnxruntime")(batch8) as b8:
        m1 = b1.measure(onnx_artifact)
        m8 = b8.measure(onnx_artifact)
    assert m8.median_us > 2 * m1.median_us
    assert m1.settings_fingerprint != m8.settings_fingerprint
    assert np.isfinite(m8.p90_us)
