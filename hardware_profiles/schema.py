"""The schema of a hardware profile: where and how one latency is measured.

Profiles are YAML data, one file per target; the file stem is the profile's name. The schema
forbids unknown keys so that a typo (``warmpu:``) is an error, never a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DeviceClass = Literal[
    "cpu",
    "arm-cpu",
    "turing",
    "ampere",
    "ada",
    "hopper",
    "blackwell",
    "jetson-orin",
    "jetson-xavier",
    "jetson-nano",
]
Location = Literal["local", "remote"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]

_PATTERN = re.compile(r"^(\d+):(\d+)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Numbers are strict field by field (a model-wide strict mode would refuse YAML lists for tuples):
# YAML's `true` is not the number 1 (`batch_size: true` is a mistake, not a batch of one), nor is
# "8" the number 8. Floats still take integers.
def _int(*, ge: int | None = None, le: int | None = None) -> Any:
    return Field(strict=True, ge=ge, le=le)


def _float(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    return Field(strict=True, allow_inf_nan=False, ge=ge, gt=gt, le=le, lt=lt)


class WarmupPolicy(_Strict):
    """Untimed runs before timing starts: at least ``runs`` and at least ``min_seconds``."""

    runs: Annotated[int, _int(ge=0, le=100_000)] = 10
    min_seconds: Annotated[float, _float(ge=0, le=600)] = 0.2


class RepeatPolicy(_Strict):
    """Timed runs: adaptive stopping once the median is known well enough.

    Timing stops at the first check (every ``check_every`` runs, after ``min_runs``) where the
    95% confidence interval of the median has a half-width of at most ``target_rel_precision``
    of the median, or when ``max_runs`` or ``max_seconds`` is reached (the measurement then
    reports that it did not converge).
    """

    min_runs: Annotated[int, _int(ge=5, le=1_000_000)] = 30
    max_runs: Annotated[int, _int(ge=5, le=1_000_000)] = 2000
    max_seconds: Annotated[float, _float(gt=0, le=3600)] = 2.0
    check_every: Annotated[int, _int(ge=1, le=10_000)] = 10
    target_rel_precision: Annotated[float, _float(gt=0, lt=1)] = 0.01

    @model_validator(mode="after")
    def _runs_ordered(self) -> RepeatPolicy:
        if self.max_runs < self.min_runs:
            raise ValueError(
                f"max_runs ({self.max_runs}) must be at least min_runs ({self.min_runs})"
            )
        return self


class TensorRTOptions(_Strict):
    """Builder and timing settings used by the TensorRT backends only."""

    workspace_mib: Annotated[int, _int(ge=16, le=1_048_576)] = 1024
    builder_optimization_level: Annotated[int, _int(ge=0, le=5)] = 3
    use_cuda_graph: Annotated[bool, Field(strict=True)] = False
    no_data_transfers: Annotated[bool, Field(strict=True)] = True


class HardwareProfile(_Strict):
    """One latency target.

    Attributes:
        name: the profile's name; equal to the YAML file's stem.
        backend: key of a latency backend in ``latency_models.registry``.
        device_class: the family of hardware this profile describes.
        location: ``local`` runs in this process; ``remote`` goes to an agent on the device.
        precision: numeric precision the backend builds for.
        batch_size: batch of the exported model and of the timed inputs.
        dim_values: values for other symbolic input dimensions (``{"seq": 128}``).
        threads: intra-op threads; ``None`` leaves the backend's default.
        execution_provider / provider_options: ONNX Runtime provider and its options.
        graph_optimization: ONNX Runtime graph optimisation level.
        warmup / repeat: the timing policy.
        channel_multiple: kept channel counts are rounded to a multiple of this.
        sparsity_patterns: N:M patterns the target runs faster than dense (``"2:4"``).
        timeout_s: how long one measurement may take before it counts as failed.
        tensorrt: TensorRT builder settings, for the TensorRT backends.
    """

    name: Annotated[str, Field(min_length=1, max_length=100)]
    description: Annotated[str, Field(max_length=2000)] = ""
    backend: Annotated[str, Field(min_length=1, max_length=50)]
    device_class: DeviceClass
    location: Location = "local"
    precision: Precision = "fp32"
    batch_size: Annotated[int, _int(ge=1, le=65_536)] = 1
    # Capped so that the inputs a backend allocates stay within reach of a real model.
    dim_values: Annotated[
        dict[Annotated[str, Field(max_length=100)], Annotated[int, _int(ge=1, le=1_000_000)]], Field(max_length=32)
    ] = Field(default_factory=dict)
    threads: Annotated[int, _int(ge=1, le=1024)] | None = None
    execution_provider: Annotated[str, Field(max_length=100)] = "CPUExecutionProvider"
    provider_options: Annotated[
        dict[Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=1000)]], Field(max_length=64)
    ] = Field(default_factory=dict)
    graph_optimization: GraphOptimization = "all"
    warmup: WarmupPolicy = WarmupPolicy()
    repeat: RepeatPolicy = RepeatPolicy()
    channel_multiple: Annotated[int, _int(ge=1, le=1024)] = 1
    sparsity_patterns: Annotated[tuple[Annotated[str, Field(max_length=16)], ...], Field(max_length=16)] = ()
    timeout_s: Annotated[float, _float(gt=0, le=86_400)] = 300.0
    tensorrt: TensorRTOptions = TensorRTOptions()

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"name {value!r} must be lower case letters, digits, '.', '_' or '-'"
            )
        return value

    @field_validator("sparsity_patterns")
    @classmethod
    def _patterns_are_n_of_m(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            match = _PATTERN.match(pattern)
            if match is None:
                raise ValueError(f"sparsity pattern {pattern!r} must look like 'N:M', e.g. '2:4'")
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m <= 64:
                raise ValueError(f"sparsity pattern {pattern!r} needs 0 < N < M <= 64")
        if len(set(value)) != len(value):
            raise ValueError(f"sparsity patterns repeat: {list(value)}")
        return value

    def fingerprint(self) -> str:
        """A short hash of every setting that can change a measured latency.

        Descriptive fields (``description``) and the search-side ``channel_multiple`` and
        ``sparsity_patterns`` are left out: they change what is measured, not how.
        """
        settings = self.model_dump(
            exclude={"description", "channel_multiple", "sparsity_patterns", "timeout_s"}
        )
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; the pattern must already be valid."""
    n, m = pattern.split(":")
    return int(n), int(m)
