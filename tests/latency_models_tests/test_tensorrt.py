"""TensorRT and trtexec backends, tested without a GPU.

``fake_tensorrt`` (a stand-in module recording calls) checks what each profile turns into;
the trtexec timings parsed here are a sample written to trtexec's documented ``--exportTimes``
format (labelled as such), and a stand-in ``trtexec`` script exercises the subprocess path.
Nothing here measures a GPU, and no figure from these tests is a TensorRT latency.
"""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path
from types import ModuleType

import pytest

from hardware_profiles import HardwareProfile, load_profile
from latency_models import ArtifactError, BackendUnavailable, MeasurementError, registry
from latency_models.trt import BuildSettings, build_engine, cuda_device_count, sparse_layers, timing_cache_path
from latency_models.trtexec import TrtexecBackend, parse_export_times, trtexec_command

TRT_PROFILES = ["ampere-trt-fp16", "ampere-trt-int8", "hopper-trt-fp16", "jetson-orin-trt-fp16",
                "jetson-nano-trt-fp16"]


@pytest.fixture
def fake_trt() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_tensorrt", Path(__file__).with_name("fake_tensorrt.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.reset()
    return module


def _calls(fake: ModuleType, name: str) -> list[object]:
    return [value for call, value in fake.calls if call == name]


@pytest.mark.parametrize("name", TRT_PROFILES)
def test_shipped_trt_profiles_use_a_tensorrt_backend(name: str) -> None:
    assert load_profile(name).backend in {"tensorrt", "trtexec"}


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("ampere-trt-fp16", ("FP16", "SPARSE_WEIGHTS")),
        ("ampere-trt-int8", ("INT8", "FP16", "SPARSE_WEIGHTS")),
        ("hopper-trt-fp16", ("FP16", "SPARSE_WEIGHTS")),
        ("jetson-orin-trt-fp16", ("FP16", "SPARSE_WEIGHTS")),
        ("jetson-nano-trt-fp16", ("FP16",)),  # Maxwell: no sparse tensor cores
    ],
)
def test_profile_to_builder_settings(name: str, flags: tuple[str, ...]) -> None:
    profile = load_profile(name)
    settings = BuildSettings.from_profile(profile)
    assert settings.flags == flags
    assert settings.workspace_bytes == profile.tensorrt.workspace_mib * 2**20
    assert settings.int8_dummy_ranges == (profile.precision == "int8")


def test_build_engine_against_fake_tensorrt(fake_trt: ModuleType) -> None:
    profile = load_profile("ampere-trt-fp16").model_copy(update={"batch_size": 4})
    built = build_engine(fake_trt, b"onnx-bytes", profile, timing_cache=b"old")
    assert built.plan == b"fake-plan"
    assert built.timing_cache == b"timing:old"  # the cache read in is the cache written out
    assert _calls(fake_trt, "create_network") == [0]
    assert _calls(fake_trt, "set_flag") == ["FP16", "SPARSE_WEIGHTS"]
    assert _calls(fake_trt, "set_memory_pool_limit") == [("WORKSPACE", 4096 * 2**20)]
    assert _calls(fake_trt, "builder_optimization_level") == [3]
    assert _calls(fake_trt, "profiling_verbosity") == ["DETAILED"]
    assert _calls(fake_trt, "create_timing_cache") == [b"old"]
    # The dynamic batch dimension is pinned to the profile's batch size.
    assert _calls(fake_trt, "set_shape") == [("input", (4, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32))]
    assert built.input_shapes == {"input": (4, 3, 32, 32)}
    assert _calls(fake_trt, "set_dynamic_range") == []


def test_int8_without_calibration_sets_dummy_ranges(fake_trt: ModuleType) -> None:
    build_engine(fake_trt, b"x", load_profile("ampere-trt-int8"))
    ranges = _calls(fake_trt, "set_dynamic_range")
    assert ("input", -4.0, 4.0) in ranges and ("layer1_out0", -4.0, 4.0) in ranges
    assert _calls(fake_trt, "set_flag") == ["INT8", "FP16", "SPARSE_WEIGHTS"]


def test_parser_errors_are_reported(fake_trt: ModuleType) -> None:
    fake_trt.OnnxParser.reject_with = "Unsupported ONNX op: NonMaxSuppression"
    with pytest.raises(ArtifactError, match="ONNX parser rejected the model: Unsupported ONNX op: NonMaxSuppression"):
        build_engine(fake_trt, b"x", load_profile("ampere-trt-fp16"))


def test_failed_build_is_a_measurement_error(fake_trt: ModuleType) -> None:
    fake_trt.Builder.fail_build = True
    with pytest.raises(MeasurementError, match="could not build an engine"):
        build_engine(fake_trt, b"x", load_profile("hopper-trt-fp16"))


def test_sparse_layers_from_inspector_json() -> None:
    info = json.dumps({"Layers": [
        {"Name": "conv1", "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_f16"},
        {"Name": "conv2", "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16"},
        "a layer name only (LAYER_NAMES_ONLY verbosity)",
    ]})
    assert sparse_layers(info) == ["conv1"]
    assert sparse_layers("not json") == []


def test_timing_cache_is_per_profile_device_and_version(tmp_path: Path) -> None:
    profile = load_profile("ampere-trt-fp16")
    a = timing_cache_path(tmp_path, profile, "NVIDIA A10", "10.8.0")
    b = timing_cache_path(tmp_path, profile, "NVIDIA A100-SXM4-80GB", "10.8.0")
    c = timing_cache_path(tmp_path, load_profile("hopper-trt-fp16"), "NVIDIA A10", "10.8.0")
    assert len({a, b, c}) == 3 and a.name == "timing-ampere-trt-fp16-nvidia-a10-trt10.8.0.cache"


@pytest.mark.parametrize("name", TRT_PROFILES)
def test_trtexec_flags(name: str, onnx_artifact: Path, tmp_path: Path) -> None:
    profile = load_profile(name)
    command = trtexec_command("trtexec", profile, onnx_artifact, tmp_path / "t.json")
    assert command[0] == "trtexec" and f"--onnx={onnx_artifact}" in command
    assert f"--exportTimes={tmp_path / 't.json'}" in command
    assert ("--fp16" in command) == (profile.precision in {"fp16", "int8"})
    assert ("--int8" in command) == (profile.precision == "int8")
    assert ("--sparsity=enable" in command) == ("2:4" in profile.sparsity_patterns)
    assert ("--useCudaGraph" in command) == profile.tensorrt.use_cuda_graph
    assert ("--noDataTransfers" in command) == profile.tensorrt.no_data_transfers
    assert f"--memPoolSize=workspace:{profile.tensorrt.workspace_mib}M" in command
    assert f"--duration={profile.repeat.max_seconds:g}" in command
    # The fixture's batch dimension is dynamic: trtexec gets the profile's batch.
    assert "--shapes=input:1x3x32x32" in command


# A sample written by hand to trtexec's documented --exportTimes format (TensorRT 10's
# sampleReporting: a JSON list, one record per inference, times in milliseconds).
SAMPLE_EXPORT_TIMES = [
    {"startEnqMs": 0.10, "endEnqMs": 0.12, "startH2dMs": 0.12, "endH2dMs": 0.12, "startComputeMs": 0.12,
     "endComputeMs": 0.62, "startD2hMs": 0.62, "endD2hMs": 0.62, "h2dMs": 0.0, "computeMs": 0.50,
     "d2hMs": 0.0, "latencyMs": 0.50},
    {"startEnqMs": 0.70, "endEnqMs": 0.72, "startH2dMs": 0.72, "endH2dMs": 0.75, "startComputeMs": 0.75,
     "endComputeMs": 1.27, "startD2hMs": 1.27, "endD2hMs": 1.30, "h2dMs": 0.03, "computeMs": 0.52,
     "d2hMs": 0.03, "latencyMs": 0.58},
]


def test_parse_export_times_sample() -> None:
    assert parse_export_times(SAMPLE_EXPORT_TIMES, transfers=False) == pytest.approx([500.0, 520.0])
    assert parse_export_times(SAMPLE_EXPORT_TIMES, transfers=True) == pytest.approx([500.0, 580.0])
    with pytest.raises(MeasurementError, match="not a JSON list"):
        parse_export_times({"computeMs": 1}, transfers=False)
    with pytest.raises(MeasurementError, match="no valid 'computeMs' values"):
        parse_export_times([{"latencyMs": 1.0}], transfers=False)


STANDIN_TRTEXEC = """#!{python}
# Stand-in for trtexec (no GPU here): writes --exportTimes records in trtexec's format.
import json, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
scale = 2.0 if "tiny64" in args["--onnx"] else 1.0
records = [{{"computeMs": 0.5 * scale + 0.001 * i, "latencyMs": 0.6 * scale}} for i in range(50)]
json.dump(records, open(args["--exportTimes"], "w"))
print("[I] TensorRT version: 10.0.0 (stand-in)")
"""


def test_trtexec_backend_with_a_standin_binary(tmp_path: Path, onnx_artifact: Path, onnx_artifact_wide: Path) -> None:
    binary = tmp_path / "trtexec"
    binary.write_text(STANDIN_TRTEXEC.format(python=sys.executable))
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    profile = load_profile("jetson-orin-trt-fp16").model_copy(update={"backend": "trtexec"})
    with TrtexecBackend(profile, binary=str(binary), cache_dir=tmp_path / "cache") as backend:
        single = backend.measure(onnx_artifact)
        paired = backend.measure_paired(onnx_artifact, onnx_artifact_wide)
    assert single.n == 50 and single.median_us == pytest.approx(524.5, abs=1.0)
    assert single.backend == "trtexec" and single.backend_version == "10.0.0 (stand-in)"
    assert paired.ratio == pytest.approx(524.5 / 1024.5, rel=1e-3)  # medians of the two stand-in traces


def test_trtexec_refusals(tmp_path: Path, onnx_artifact: Path) -> None:
    profile = load_profile("jetson-orin-trt-fp16")
    with pytest.raises(BackendUnavailable, match="needs TensorRT's trtexec on PATH"):
        TrtexecBackend(profile, binary="no-such-trtexec").open()
    failing = tmp_path / "trtexec"
    failing.write_text(f"#!{sys.executable}\nimport sys\nprint('[E] Engine could not be created'); sys.exit(1)\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    with TrtexecBackend(profile, binary=str(failing), cache_dir=tmp_path) as backend:
        with pytest.raises(MeasurementError, match=r"trtexec failed \(exit 1\): \[E\] Engine could not be created"):
            backend.measure(onnx_artifact)
        with pytest.raises(ArtifactError, match="does not exist"):
            backend.measure(tmp_path / "missing.onnx")


@pytest.mark.skipif(cuda_device_count() > 0 and importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT and a GPU are present")
@pytest.mark.parametrize("name", TRT_PROFILES)
def test_tensorrt_backend_refuses_here_in_one_line(name: str) -> None:
    profile: HardwareProfile = load_profile(name)
    with pytest.raises(BackendUnavailable) as caught:
        with registry.get("tensorrt")(profile):
            pass
    message = str(caught.value)
    assert "needs the tensorrt package and an NVIDIA GPU" in message and "\n" not in message


@pytest.mark.requires_gpu
@pytest.mark.skipif(cuda_device_count() == 0 or importlib.util.find_spec("tensorrt") is None,
                    reason="requires_gpu: needs an NVIDIA GPU and the tensorrt package")
def test_tensorrt_measures_on_a_real_gpu(onnx_artifact: Path) -> None:
    profile = load_profile("ampere-trt-fp16")
    with registry.get("tensorrt")(profile) as backend:
        result = backend.measure(onnx_artifact)
    assert result.median_us > 0 and result.backend == "tensorrt"
