"""The JSON bodies of the hub <-> agent protocol (version 1), shared by both sides.

The agent pulls: it leases a job for its profile, downloads the ONNX artifact(s) by sha256,
measures, and posts a result or a failure; heartbeats keep it listed as live and extend its lease.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from latency_models.base import Measurement

API_PREFIX = "/v1"
MAX_RESULT_BYTES = 64 * 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LeaseRequest(_Body):
    profile: Annotated[str, Field(min_length=1, max_length=100)]


class JobSpec(_Body):
    """A leased job: what to measure, paired with ``reference_sha256`` when it is not empty."""

    id: int
    profile: str
    profile_fingerprint: str
    artifact_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    reference_sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    lease_s: float
    attempt: int


class HeartbeatRequest(_Body):
    job_id: int | None = None
    environment: dict[str, str] | None = None


class HeartbeatResponse(_Body):
    lease_held: bool | None = None


class ResultBody(_Body):
    """A measurement (the ``Measurement`` dataclass, validated field by field) and, for a paired
    job, the ratio to the reference with its 95% interval."""

    measurement: Measurement
    ratio: Annotated[float, Field(gt=0)] | None = None
    ratio_ci: tuple[float, float] | None = None

    @field_validator("measurement")
    @classmethod
    def _plausible(cls, value: Measurement) -> Measurement:
        if not value.median_us > 0 or value.n < 1:
            raise ValueError(f"implausible measurement: median {value.median_us} us over {value.n} runs")
        return value


class FailureBody(_Body):
    error: Annotated[str, Field(min_length=1, max_length=2000)]


class StatusBody(_Body):
    status: str


class ErrorBody(_Body):
    error: str
    detail: Any
