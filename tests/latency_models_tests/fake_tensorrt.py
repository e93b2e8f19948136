"""``fake_tensorrt``: a stand-in for the ``tensorrt`` module that records every call.

It implements only the surface ``latency_models.trt.build_engine`` touches, with the names and
signatures of TensorRT 10's Python API, so tests can check what a profile turns into without a
GPU. It builds nothing: ``build_serialized_network`` returns placeholder bytes.
"""

from __future__ import annotations

from typing import Any

calls: list[tuple[str, Any]] = []


def reset() -> None:
    calls.clear()


class Logger:
    WARNING = "WARNING"

    def __init__(self, severity: str) -> None:
        calls.append(("Logger", severity))


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class ProfilingVerbosity:
    DETAILED = "DETAILED"


class BuilderFlag:
    FP16 = "FP16"
    BF16 = "BF16"
    INT8 = "INT8"
    SPARSE_WEIGHTS = "SPARSE_WEIGHTS"


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.shape = shape

    def set_dynamic_range(self, low: float, high: float) -> bool:
        calls.append(("set_dynamic_range", (self.name, low, high)))
        return True


class _Layer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.num_outputs = 1

    def get_output(self, index: int) -> _Tensor:
        return _Tensor(f"{self.name}_out{index}", (1,))


class _Network:
    # The model the fake parser "reads": one input with a dynamic batch, two layers.
    INPUTS = [("input", (-1, 3, 32, 32))]

    def __init__(self) -> None:
        self.num_inputs = len(self.INPUTS)
        self.num_layers = 2

    def get_input(self, index: int) -> _Tensor:
        return _Tensor(*self.INPUTS[index])

    def get_layer(self, index: int) -> _Layer:
        return _Layer(f"layer{index}")


class _Error:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text


class OnnxParser:
    reject_with: str | None = None

    def __init__(self, network: _Network, logger: Logger) -> None:
        self.num_errors = 0

    def parse(self, data: bytes) -> bool:
        calls.append(("parse", len(data)))
        if OnnxParser.reject_with:
            self.num_errors = 1
            return False
        return True

    def get_error(self, index: int) -> _Error:
        return _Error(OnnxParser.reject_with or "")


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return b"timing:" + self.data


class _OptimizationProfile:
    def set_shape(self, name: str, low: tuple[int, ...], opt: tuple[int, ...], high: tuple[int, ...]) -> None:
        calls.append(("set_shape", (name, low, opt, high)))


class _Config:
    def __init__(self) -> None:
        self._level = 3
        self._verbosity: str | None = None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        calls.append(("set_memory_pool_limit", (pool, size)))

    @property
    def builder_optimization_level(self) -> int:
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        calls.append(("builder_optimization_level", level))
        self._level = level

    @property
    def profiling_verbosity(self) -> str | None:
        return self._verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value: str) -> None:
        calls.append(("profiling_verbosity", value))
        self._verbosity = value

    def set_flag(self, flag: str) -> None:
        calls.append(("set_flag", flag))

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        calls.append(("create_timing_cache", data))
        return _TimingCache(data)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        calls.append(("set_timing_cache", ignore_mismatch))
        return True

    def add_optimization_profile(self, profile: _OptimizationProfile) -> int:
        calls.append(("add_optimization_profile", None))
        return 0


class Builder:
    fail_build = False

    def __init__(self, logger: Logger) -> None:
        calls.append(("Builder", None))

    def create_network(self, flags: int) -> _Network:
        calls.append(("create_network", flags))
        return _Network()

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _OptimizationProfile:
        return _OptimizationProfile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        calls.append(("build_serialized_network", None))
        return None if Builder.fail_build else b"fake-plan"
