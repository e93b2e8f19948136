from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hardware_profiles import (
    BUILTIN_DIR,
    HardwareProfile,
    InvalidProfileError,
    ProfileNotFoundError,
    discover,
    load_profile,
    load_profile_file,
    names,
)
from latency_models import registry

REQUIRED = {
    "cpu-ort-fp32",
    "ampere-trt-fp16",
    "ampere-trt-int8",
    "hopper-trt-fp16",
    "jetson-orin-trt-fp16",
    "jetson-orin-ort-cpu",
    "jetson-nano-trt-fp16",
}


def test_required_profiles_ship() -> None:
    assert REQUIRED <= set(names())


@pytest.mark.parametrize("name", names())
def test_every_shipped_profile_is_valid(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.backend in registry.names()
    assert profile.description


def test_jetsons_are_remote_and_cpu_is_local() -> None:
    assert load_profile("cpu-ort-fp32").location == "local"
    for name in ("jetson-orin-trt-fp16", "jetson-orin-ort-cpu", "jetson-nano-trt-fp16"):
        assert load_profile(name).location == "remote"
    assert load_profile("jetson-orin-trt-fp16").sparsity_patterns == ("2:4",)
    assert load_profile("jetson-nano-trt-fp16").sparsity_patterns == ()


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(ProfileNotFoundError, match=r"no hardware profile 'cpu-ort-fp33'; known: .*cpu-ort-fp32"):
        load_profile("cpu-ort-fp33")


def test_user_folder_adds_and_overrides(write_profile: Callable[[str, str], Path]) -> None:
    mine = write_profile("my-laptop", "backend: onnxruntime\ndevice_class: cpu\nthreads: 4\n")
    write_profile("cpu-ort-fp32", "backend: onnxruntime\ndevice_class: cpu\nthreads: 2\n")
    sources = discover([mine.parent])
    assert sources["my-laptop"].builtin is False
    assert sources["cpu-ort-fp32"].path.parent == mine.parent
    assert load_profile("cpu-ort-fp32", [mine.parent]).threads == 2
    assert sources["ampere-trt-fp16"].builtin is True


def test_missing_profile_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidProfileError, match="does not exist: check --profiles-dir"):
        discover([tmp_path / "nope"])


def test_same_name_in_two_user_folders_is_refused(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "dup.yaml").write_text("backend: onnxruntime\ndevice_class: cpu\n")
    with pytest.raises(InvalidProfileError, match="'dup' is defined twice"):
        discover([tmp_path / "a", tmp_path / "b"])


def test_fingerprint_tracks_timing_settings_only() -> None:
    base = load_profile("cpu-ort-fp32")
    same = base.model_copy(update={"description": "other words", "channel_multiple": 8})
    other = base.model_copy(update={"threads": 2})
    assert base.fingerprint() == same.fingerprint()
    assert base.fingerprint() != other.fingerprint()


def test_profiles_are_frozen() -> None:
    profile = load_profile("cpu-ort-fp32")
    with pytest.raises(Exception, match="frozen"):
        profile.threads = 4  # type: ignore[misc]


MALFORMED = [
    ("typo-key", "backend: onnxruntime\ndevice_class: cpu\nthreds: 2\n",
     r"unknown field 'threds'; allowed: name, description, backend"),
    ("nested-typo", "backend: onnxruntime\ndevice_class: cpu\nwarmup: {runz: 3}\n",
     r"unknown field 'warmup.runz'; allowed: runs, min_seconds"),
    ("bad-device", "backend: onnxruntime\ndevice_class: tpu\n",
     r"field 'device_class': Input should be 'cpu', 'arm-cpu'.*got 'tpu'"),
    ("bad-location", "backend: onnxruntime\ndevice_class: cpu\nlocation: cloud\n",
     r"field 'location': Input should be 'local' or 'remote'"),
    ("bad-precision", "backend: onnxruntime\ndevice_class: cpu\nprecision: fp8\n",
     r"field 'precision': Input should be 'fp32', 'fp16', 'bf16' or 'int8'"),
    ("no-backend", "device_class: cpu\n", r"field 'backend' is required"),
    ("zero-batch", "backend: onnxruntime\ndevice_class: cpu\nbatch_size: 0\n",
     r"field 'batch_size': Input should be greater than or equal to 1"),
    ("bad-pattern", "backend: onnxruntime\ndevice_class: cpu\nsparsity_patterns: ['2/4']\n",
     r"sparsity pattern '2/4' must look like 'N:M'"),
    ("n-ge-m", "backend: onnxruntime\ndevice_class: cpu\nsparsity_patterns: ['4:4']\n",
     r"sparsity pattern '4:4' needs 0 < N < M"),
    ("runs-unordered", "backend: onnxruntime\ndevice_class: cpu\nrepeat: {min_runs: 50, max_runs: 10}\n",
     r"max_runs \(10\) must be at least min_runs \(50\)"),
    ("precision-range", "backend: onnxruntime\ndevice_class: cpu\nrepeat: {target_rel_precision: 1.5}\n",
     r"field 'repeat.target_rel_precision': Input should be less than 1"),
    ("not-a-mapping", "- just\n- a list\n", r"expected a mapping of settings, got list"),
    ("bad-yaml", "backend: [onnxruntime\ndevice_class: cpu\n", r"at line \d+, column \d+"),
    ("wrong-name", "name: other\nbackend: onnxruntime\ndevice_class: cpu\n",
     r"name 'other' must equal the file name 'wrong-name'"),
    ("neg-timeout", "backend: onnxruntime\ndevice_class: cpu\ntimeout_s: -1\n",
     r"field 'timeout_s': Input should be greater than 0"),
    ("threads-text", "backend: onnxruntime\ndevice_class: cpu\nthreads: many\n", r"field 'threads'"),
]


@pytest.mark.parametrize(("name", "text", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_profiles_are_refused_with_field_and_allowed_values(
    write_profile: Callable[[str, str], Path], name: str, text: str, message: str
) -> None:
    path = write_profile(name, text)
    with pytest.raises(InvalidProfileError, match=message) as caught:
        load_profile_file(path)
    assert str(caught.value).startswith(f"profile {name}.yaml: ")
    assert "\n" not in str(caught.value)


def test_unreadable_profile_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidProfileError, match="cannot read profile"):
        load_profile_file(tmp_path / "absent.yaml")


def test_builtin_dir_holds_only_valid_yaml() -> None:
    files = sorted(BUILTIN_DIR.glob("*.yaml"))
    assert len(files) >= 7
    assert all(isinstance(load_profile_file(f), HardwareProfile) for f in files)
