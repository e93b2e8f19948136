"""The profile and measurement commands, driven through Typer's runner on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from search.cli.main import app

runner = CliRunner()


def test_profiles_list_json() -> None:
    result = runner.invoke(app, ["profiles", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["cpu-ort-fp32"]["backend"] == "onnxruntime"
    assert rows["jetson-orin-trt-fp16"]["location"] == "remote"
    assert rows["ampere-trt-int8"]["sparsity_patterns"] == ["2:4"]


def test_profiles_list_table_and_user_folder(fast_profile_path: Path) -> None:
    result = runner.invoke(app, ["--profiles-dir", str(fast_profile_path.parent), "profiles", "list"])
    assert result.exit_code == 0, result.output
    assert "cpu-ort-fp32" in result.stdout and "fast" in result.stdout


def test_profiles_dir_from_environment(fast_profile_path: Path) -> None:
    result = runner.invoke(
        app, ["profiles", "show", "fast", "--json"], env={"HWPRUNE_PROFILES": str(fast_profile_path.parent)}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["repeat"]["max_seconds"] == 0.3


def test_profiles_show_yaml() -> None:
    result = runner.invoke(app, ["profiles", "show", "ampere-trt-fp16"])
    assert result.exit_code == 0
    assert "backend: tensorrt" in result.stdout
    assert "# profile ampere-trt-fp16 (fingerprint " in result.stdout


def test_profiles_show_output_validates_as_is(tmp_path: Path) -> None:
    # `profiles show X > f.yaml && profiles validate f.yaml`, under any file name.
    shown = runner.invoke(app, ["profiles", "show", "cpu-ort-fp32"])
    assert shown.exit_code == 0, shown.output
    path = tmp_path / "my-board.yaml"
    path.write_text(shown.stdout)
    checked = runner.invoke(app, ["profiles", "validate", str(path)])
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.startswith(f"ok: {path}")


def test_profiles_show_unknown_exits_2_listing_known() -> None:
    result = runner.invoke(app, ["profiles", "show", "cpu-ort"])
    assert result.exit_code == 2
    assert "no hardware profile 'cpu-ort'; known:" in result.stderr
    assert "cpu-ort-fp32" in result.stderr
    assert "Traceback" not in result.output


def test_profiles_validate_ok(fast_profile_path: Path) -> None:
    result = runner.invoke(app, ["profiles", "validate", str(fast_profile_path)])
    assert result.exit_code == 0
    assert result.stdout.startswith("ok: ")


def test_profiles_validate_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("backend: onnxruntime\ndevice_class: gpu\n")
    result = runner.invoke(app, ["profiles", "validate", str(path)])
    assert result.exit_code == 2
    assert "field 'device_class': Input should be 'cpu'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_profiles_validate_unknown_backend(tmp_path: Path) -> None:
    path = tmp_path / "tvm.yaml"
    path.write_text("backend: tvm\ndevice_class: cpu\n")
    result = runner.invoke(app, ["profiles", "validate", str(path)])
    assert result.exit_code == 2
    assert "backend 'tvm' is unknown; known: onnxruntime, tensorrt, trtexec" in result.stderr


def test_measure_json(fast_profile_path: Path, onnx_artifact: Path) -> None:
    result = runner.invoke(
        app,
        ["--profiles-dir", str(fast_profile_path.parent), "measure", str(onnx_artifact), "--profile", "fast", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("median_us", "p10_us", "p90_us", "mean_us", "stdev_us", "n", "backend",
                "backend_version", "device", "profile"):
        assert key in data
    assert data["profile"] == "fast" and data["backend"] == "onnxruntime"
    assert data["p10_us"] <= data["median_us"] <= data["p90_us"]


def test_measure_paired_json(
    fast_profile_path: Path, onnx_artifact: Path, onnx_artifact_wide: Path
) -> None:
    result = runner.invoke(
        app,
        ["--profiles-dir", str(fast_profile_path.parent), "measure", str(onnx_artifact),
         "--profile", "fast", "--vs", str(onnx_artifact_wide), "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert 0 < data["ratio"] < 0.5
    low, high = data["ratio_ci"]
    assert low <= data["ratio"] <= high


def test_measure_human_output(fast_profile_path: Path, onnx_artifact: Path) -> None:
    result = runner.invoke(
        app, ["--profiles-dir", str(fast_profile_path.parent), "measure", str(onnx_artifact), "-p", "fast"]
    )
    assert result.exit_code == 0, result.output
    assert "fast: median" in result.stdout and "onnxruntime" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["measure", "{missing}", "-p", "cpu-ort-fp32"], 2, "does not exist"),
        (["measure", "{garbage}", "-p", "cpu-ort-fp32"], 2, "ONNX Runtime cannot load garbage.onnx"),
        (["measure", "{model}", "-p", "cpu-ort-fp99"], 2, "no hardware profile 'cpu-ort-fp99'; known:"),
        (["measure", "{model}", "-p", "ampere-trt-fp16"], 2, "needs the tensorrt package and an NVIDIA GPU"),
        (["measure", "{model}", "-p", "jetson-orin-ort-cpu"], 2, "is measured on a remote device"),
        (["measure", "{model}"], 2, "Missing option"),
    ],
)
def test_measure_errors(
    tmp_path: Path, onnx_artifact: Path, args: list[str], code: int, message: str
) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not onnx")
    values = {"missing": str(tmp_path / "missing.onnx"), "garbage": str(garbage), "model": str(onnx_artifact)}
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_doctor_lists_backends() -> None:
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.stdout and "torch-pruning" in result.stdout
    assert "hwprune[tensorrt]" in result.stdout  # rich markup must not eat the extra's brackets


def test_doctor_lists_the_devices_model_work_can_run_on() -> None:
    import torch

    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    names = [device["name"] for device in json.loads(result.stdout)["devices"]]
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert names == ["cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


def test_doctor_gpu_refuses_without_tensorrt() -> None:
    from latency_models.trt import cuda_device_count

    if cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    result = runner.invoke(app, ["doctor", "--gpu"])
    assert result.exit_code == 2
    assert "needs the tensorrt package and an NVIDIA GPU: pip install 'hwprune[tensorrt]'" in result.stderr


def test_gpu_check_plumbing_on_the_onnxruntime_cpu_backend() -> None:
    """The self-check's export, 2:4 plan and paired timing, run on ONNX Runtime CPU as a stand-in
    for TensorRT (no GPU here): CPU kernels ignore 2:4, so no speedup is expected or asserted."""
    from hardware_profiles import load_profile
    from search.cli.doctor import gpu_check

    rows = gpu_check(load_profile("cpu-ort-fp32"), resolution=64)
    assert [r.model for r in rows] == ["resnet18 dense", "resnet18 2:4"]
    assert rows[1].nm_layers > 10 and rows[0].median_us > 0 and rows[1].ratio_to_dense > 0
