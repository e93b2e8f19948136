"""The JSON bodies of the hub <-> agent protocol (version 1), shared by both sides.

The agent pulls: it leases a job for its profile, downloads the ONNX artifact(s) by sha256,
measures, and posts a result or a failure; heartbeats keep it listed as live and extend its lease.

Version 1 has two job kinds. ``measure`` (one artifact, alone or paired with a reference) is
what every agent runs. ``batch`` (a lookup table's layers and plans, measured in one lease, see
``latency_models.batch``) was added compatibly: an agent says it runs batches in its heartbeat's
environment (``job_kinds``), the hub hands batches only to such agents and fails a batch that no
live agent of its profile can run; the new fields are left out of a ``measure`` job's lease, so
agents that predate batches parse it as before.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter

from latency_models.base import Measurement, MeasurementResult
from latency_models.batch import BatchFigures, PairedFigure
from latency_models.predictors.features import LayerFeatures
from latency_models.store import Outcome

API_PREFIX = "/v1"
MAX_RESULT_BYTES = 64 * 1024
# A batch's result has one figure per layer shape and per plan: a larger cap, for that endpoint only.
MAX_BATCH_RESULT_BYTES = 4 * 1024 * 1024
MEASURE, BATCH = "measure", "batch"
# The environment key by which an agent lists the job kinds it runs (absent: ``measure`` only).
JOB_KINDS_KEY = "job_kinds"
# Job ids are INTEGER columns: 32-bit on PostgreSQL (64 on SQLite). A larger id can name no job,
# and would overflow the driver or the server, so it is refused as invalid input.
MAX_ID = 2**31 - 1
# strict: a JSON `true` is not an id or a count (lax pydantic would read it as 1), so a body that
# breaks the published schema is refused with 422, and one that keeps to it is never refused as
# malformed (the OpenAPI document is exactly what the hub accepts).


def _whole_number(value: object) -> object:
    """A JSON integer as JSON Schema defines it: ``5`` or ``5.0``; never ``true`` nor ``"5"``
    (lax pydantic reads both as numbers; strict pydantic refuses ``5.0``, which the schema allows)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected a JSON integer, got {type(value).__name__}")
    return value


_WHOLE = BeforeValidator(_whole_number)
# A JSON number (an integer or a decimal), never a boolean or a string, and finite (_Body).
Number = Annotated[float, Field(strict=True)]
Positive = Annotated[float, Field(strict=True, gt=0)]
NotNegative = Annotated[float, Field(strict=True, ge=0)]
JobId = Annotated[int, Field(ge=1, le=MAX_ID), _WHOLE]
AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ProfileName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# What an agent says about itself, shown by `hwprune agents list`: a few short strings.
EnvironmentText = Annotated[str, Field(max_length=500)]
Environment = Annotated[dict[Annotated[str, Field(min_length=1, max_length=64)], EnvironmentText],
                        Field(max_length=32)]


def clean_text(text: str, limit: int) -> str:
    """``text`` without control or format characters (terminal escapes, bidi overrides), at most
    ``limit`` characters: for strings from the wire that end up in a table or a log."""
    kept = "".join(c for c in text[: limit * 2] if unicodedata.category(c) not in {"Cc", "Cf", "Zl", "Zp"})
    return kept[:limit]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LeaseRequest(_Body):
    profile: ProfileName


def job_kinds(environment: dict[str, str] | None) -> frozenset[str]:
    """The job kinds an agent runs, from the environment it reported (an agent that predates
    batches reports none: it runs ``measure`` jobs)."""
    listed = (environment or {}).get(JOB_KINDS_KEY, "")
    return frozenset({MEASURE, *(k.strip() for k in listed.split(",") if k.strip())})


class BatchSpec(_Body):
    """A batch job's work: each layer built as a one-node graph (``layer_graph``) and timed
    alone, then each plan's artifact timed paired with the job's artifact (the base model)."""

    layers: Annotated[list[LayerFeatures], Field(max_length=100_000)]
    plans: Annotated[list[Sha256], Field(max_length=10_000)]


class JobSpec(_Body):
    """A leased job: what to measure, paired with ``reference_sha256`` when it is not empty;
    for a ``batch`` job, ``batch`` says what, with ``artifact_sha256`` as the base model."""

    id: int
    profile: str
    profile_fingerprint: str
    artifact_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    reference_sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    lease_s: float
    attempt: int
    kind: Annotated[str, Field(min_length=1, max_length=16)] = MEASURE
    batch: BatchSpec | None = None


class HeartbeatRequest(_Body):
    job_id: JobId | None = None
    environment: Environment | None = None
    # Measurements done so far in a batch job (sent only during one: older hubs do not know it).
    progress: Annotated[int, Field(ge=0, le=1_000_000), _WHOLE] | None = None


class HeartbeatResponse(_Body):
    lease_held: bool | None = None


class MeasurementBody(_Body):
    """``latency_models.Measurement`` on the wire, each figure constrained in the published
    schema (what a JSON Schema cannot say, the order of percentiles, is ``measurement_problems``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, from_attributes=True)

    profile: Annotated[str, Field(max_length=100)]
    backend: Annotated[str, Field(max_length=50)]
    backend_version: Annotated[str, Field(max_length=50)]
    device: Annotated[str, Field(max_length=200)]
    threads: Annotated[int, Field(ge=1, le=4096), _WHOLE] | None
    median_us: Positive
    p10_us: NotNegative
    p90_us: NotNegative
    mean_us: NotNegative
    stdev_us: NotNegative
    n: Annotated[int, Field(ge=1, le=10_000_000), _WHOLE]
    ci_low_us: NotNegative
    ci_high_us: NotNegative
    converged: Annotated[bool, Field(strict=True)]
    elapsed_s: NotNegative
    artifact_sha256: Annotated[str, Field(max_length=64)]
    settings_fingerprint: Annotated[str, Field(max_length=64)]

    def to_measurement(self) -> Measurement:
        return Measurement(**self.model_dump())


class ResultBody(_Body):
    """A measurement and, for a paired job, the ratio to the reference with its 95% interval.

    The schema is what the hub accepts: a body it validates is never refused as malformed. A
    result that does not answer its job (``problems_for``) is a conflict with the job; one that
    is inconsistent in itself (``inconsistencies``) is kept, flagged and measured again."""

    measurement: MeasurementBody
    ratio: Positive | None = None
    ratio_ci: tuple[Positive, Positive] | None = None

    @classmethod
    def of(cls, result: MeasurementResult) -> ResultBody:
        return cls(measurement=MeasurementBody.model_validate(result.measurement), ratio=result.ratio,
                   ratio_ci=result.ratio_ci)

    def to_result(self) -> MeasurementResult:
        return MeasurementResult(self.measurement.to_measurement(), self.ratio, self.ratio_ci)

    def inconsistencies(self) -> list[str]:
        """What no measurement could be: percentiles or intervals out of order, a ratio outside
        its own interval, control characters in its strings."""
        found = measurement_problems(self.measurement.to_measurement())
        if self.ratio_ci is not None and not self.ratio_ci[0] <= self.ratio_ci[1]:
            found.append(f"ratio_ci must be low <= high; got {list(self.ratio_ci)}")
        elif self.ratio is not None and self.ratio_ci is not None:
            low, high = self.ratio_ci
            if not low <= self.ratio <= high:
                found.append(f"ratio {self.ratio} lies outside its interval [{low}, {high}]")
        return found

    def problems_for(self, *, profile: str, artifact_sha256: str, paired: bool) -> list[str]:
        """What makes this result unusable for a job measuring ``artifact_sha256`` on ``profile``
        (a well-formed body can still be another job's, or miss the ratio a paired job needs)."""
        m, found = self.measurement, []
        if m.profile != profile:
            found.append(f"measurement is for profile {clean_text(m.profile, 100)!r}, the job's is {profile!r}")
        if m.artifact_sha256 != artifact_sha256:
            found.append(f"measurement is of artifact {clean_text(m.artifact_sha256, 64)!r}, "
                         f"the job's is {artifact_sha256}")
        if paired and (self.ratio is None or self.ratio_ci is None):
            found.append("a paired job needs 'ratio' and 'ratio_ci'")
        return found


def measurement_problems(m: Measurement) -> list[str]:
    """Internal inconsistencies of a measurement from the wire: non-finite or negative figures,
    unordered percentiles or interval, impossible counts, over-long or control-laden strings."""
    found = []
    figures = {name: getattr(m, name) for name in
               ("median_us", "p10_us", "p90_us", "mean_us", "stdev_us", "ci_low_us", "ci_high_us", "elapsed_s")}
    bad = [name for name, value in figures.items() if not (math.isfinite(value) and value >= 0)]
    if bad:
        return [f"{', '.join(bad)} must be finite and not negative"]
    if not m.median_us > 0:
        found.append("median_us must be positive")
    if not m.p10_us <= m.median_us <= m.p90_us:
        found.append(f"percentiles out of order: p10 {m.p10_us} <= median {m.median_us} <= p90 {m.p90_us}")
    if not m.ci_low_us <= m.median_us <= m.ci_high_us:
        found.append(f"interval [{m.ci_low_us}, {m.ci_high_us}] does not hold the median {m.median_us}")
    if not 1 <= m.n <= 10_000_000:
        found.append(f"n must be in [1, 10000000], got {m.n}")
    if m.threads is not None and not 1 <= m.threads <= 4096:
        found.append(f"threads must be in [1, 4096], got {m.threads}")
    limits = {"profile": 100, "backend": 50, "backend_version": 50, "device": 200,
              "artifact_sha256": 64, "settings_fingerprint": 64}
    for name, limit in limits.items():
        value = getattr(m, name)
        if len(value) > limit or clean_text(value, limit) != value:
            found.append(f"{name} must be at most {limit} printable characters")
    return found


# A result at rest (a job's row) has the JSON shape of a ResultBody; it was validated on arrival,
# so reading it back only rebuilds the dataclasses.
_RESULT_JSON: TypeAdapter[MeasurementResult] = TypeAdapter(MeasurementResult)


def result_to_json(result: MeasurementResult) -> str:
    """``result`` as JSON, in the shape of a ``ResultBody``."""
    return _RESULT_JSON.dump_json(result).decode()


def result_from_json(text: str | bytes) -> MeasurementResult:
    """The ``MeasurementResult`` that ``result_to_json`` wrote."""
    return _RESULT_JSON.validate_json(text)


class FigureBody(_Body):
    """``latency_models.batch.PairedFigure`` on the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, from_attributes=True)

    median_us: Positive
    ratio: Positive
    ratio_ci: tuple[Positive, Positive]

    def to_figure(self) -> PairedFigure:
        return PairedFigure(self.median_us, self.ratio, self.ratio_ci)


class BatchResultBody(_Body):
    """A batch job's figures, in the order of its ``BatchSpec``, and what measured them."""

    profile: Annotated[str, Field(max_length=100)]
    backend: Annotated[str, Field(max_length=50)]
    backend_version: Annotated[str, Field(max_length=50)]
    device: Annotated[str, Field(max_length=200)]
    layers_us: list[Positive]
    plans: list[FigureBody]

    def figures(self) -> BatchFigures:
        return BatchFigures(tuple(self.layers_us), tuple(f.to_figure() for f in self.plans))

    def problems_for(self, *, profile: str, spec: BatchSpec) -> list[str]:
        """What makes this result not the answer to batch ``spec`` on ``profile``, or not a
        measurement at all (a plan's ratio outside its own interval)."""
        found = []
        if self.profile != profile:
            found.append(f"result is for profile {clean_text(self.profile, 100)!r}, the job's is {profile!r}")
        if len(self.layers_us) != len(spec.layers):
            found.append(f"{len(self.layers_us)} layer figures for {len(spec.layers)} layers")
        if len(self.plans) != len(spec.plans):
            found.append(f"{len(self.plans)} plan figures for {len(spec.plans)} plans")
        for name in ("backend", "backend_version", "device"):
            value = getattr(self, name)
            if clean_text(value, 200) != value:
                found.append(f"{name} must be printable")
        found += [f"plan {i}'s figures must have low <= ratio <= high; got ratio {f.ratio}, interval "
                  f"{list(f.ratio_ci)}" for i, f in enumerate(self.plans)
                  if not f.ratio_ci[0] <= f.ratio <= f.ratio_ci[1]][:3]
        return found


class FailureBody(_Body):
    error: Annotated[str, Field(min_length=1, max_length=2000)]


class StatusBody(_Body):
    """``accepted``; ``duplicate`` (the holder posted again: harmless); ``flagged`` (a result
    too far from what the hub expects: kept for inspection, not cached, the job measured again)."""

    status: Outcome


class ErrorBody(_Body):
    """Every refusal: the error's type and a one-line message."""

    error: str
    detail: str
