"""The device for model work: names, resolution on this (CPU-only) machine, the deterministic
switches a GPU run sets, and moving batches. CUDA itself cannot run here: where a test pretends a
GPU exists its name says so."""

from __future__ import annotations

import os

import pytest
import torch

from search.errors import ConfigError
from search.pipeline import device as device_module
from search.pipeline.device import (
    CPU,
    ModelDevice,
    OnDevice,
    available_devices,
    check_device_name,
    deterministic,
    on_device,
    resolve_device,
    to_device,
)

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_names_accepted(name: str) -> None:
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CUDA", "cpu:0", "", "cuda:1234"])
def test_device_names_refused_in_one_line(name: str) -> None:
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda, cuda:N or mps") as caught:
        check_device_name(name)
    assert "\n" not in str(caught.value) and caught.value.exit_code == 2


@needs_no_gpu
def test_auto_falls_back_to_the_cpu_with_a_note() -> None:
    chosen = resolve_device("auto")
    assert (chosen.name, chosen.kind, chosen.requested) == ("cpu", "cpu", "auto")
    assert "no CUDA or MPS device" in chosen.note


@needs_no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_a_missing_gpu_is_refused_not_replaced(name: str) -> None:
    with pytest.raises(ConfigError, match=f"device {name!r} is not available") as caught:
        resolve_device(name)
    assert "use --device cpu or --device auto" in str(caught.value)


def test_cuda_resolution_with_a_simulated_gpu_sets_the_cublas_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "_cuda_count", lambda: 2)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert resolve_device("cuda").name == "cuda:0"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert resolve_device("cuda:1").name == "cuda:1"
    assert resolve_device("auto").name == "cuda:0"
    with pytest.raises(ConfigError, match="torch sees 2 CUDA devices"):
        resolve_device("cuda:2")


def test_deterministic_switches_for_a_gpu_are_set_and_restored_without_a_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic(ModelDevice("cuda", "cuda:0")) as switches:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert switches["cublas_workspace_config"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() == before
    with deterministic(CPU) as cpu_switches:
        assert torch.are_deterministic_algorithms_enabled() == before
    assert cpu_switches == {}


def test_a_gpu_run_refuses_a_workspace_that_cannot_reproduce_without_a_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ConfigError, match="CUBLAS_WORKSPACE_CONFIG must be"):
        with deterministic(ModelDevice("cuda", "cuda:0")):
            pass


def test_batches_move_with_their_structure_and_stay_put_on_the_cpu() -> None:
    batch = ({"input_ids": torch.ones(2, 3, dtype=torch.long)}, torch.zeros(2))
    moved = to_device(batch, torch.device("meta"))
    assert moved[0]["input_ids"].device.type == "meta" and moved[1].device.type == "meta"
    loader = [batch]
    assert on_device(loader, CPU) is loader
    (read,) = list(OnDevice(loader, torch.device("meta")))
    assert read[1].device.type == "meta"


def test_available_devices_lists_the_cpu_first() -> None:
    devices = available_devices()
    assert devices[0].name == "cpu" and "cores" in devices[0].detail
    assert len(devices) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0) + int(
        torch.backends.mps.is_available())


def test_a_search_config_names_its_device_and_refuses_others_in_one_line() -> None:
    from search.config import load_search_config

    assert load_search_config(None, {"name": "s", "example": "digits"}).device == "auto"
    assert load_search_config(None, {"name": "s", "example": "digits", "device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ConfigError, match="field 'device': must be auto, cpu, cuda, cuda:N or mps") as caught:
        load_search_config(None, {"name": "s", "example": "digits", "device": "gpu"})
    assert "\n" not in str(caught.value)


def test_thread_count_is_fixed_when_a_search_is_made_and_kept_on_resume() -> None:
    from search.config import SearchConfig, cpu_count, incompatibilities, load_search_config

    requested = load_search_config(None, {"name": "s", "example": "digits"})
    assert requested.recovery.threads is None
    stored = requested.for_this_machine()
    assert stored.recovery.threads == cpu_count() == len(os.sched_getaffinity(0))
    # Resumed on a machine of another size with the count left open: the stored count stands.
    assert incompatibilities(stored.model_copy(update={"recovery": stored.recovery.model_copy(
        update={"threads": 7})}), requested) == []
    # The device may change on resume (each trial records its own); other fields may not.
    assert incompatibilities(stored, requested.model_copy(update={"device": "cpu"})) == []
    assert incompatibilities(stored, requested.model_copy(update={"seed": 3})) == ["seed: 0 -> 3"]
    # A search stored before these settings existed recovered on the CPU with one thread.
    old = SearchConfig.from_stored({"name": "s", "example": "digits",
                                    "recovery": {"version": 2, "optimizer": "adamw"}})
    assert (old.device, old.recovery.threads) == ("cpu", 1)
