"""hwprune's own tables. Optuna's tables hold studies, trials, plans and objective values;
these hold what Optuna does not: search configurations, artifact names (their bytes are in the
artifact store) and the measurement cache.

Every table name starts with ``hwprune_`` so that the Alembic environment can leave Optuna's
tables alone.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TABLE_PREFIX = "hwprune_"


def utcnow() -> dt.datetime:
    """Now in naive UTC, the one clock of hwprune's rows (and its search records)."""
    # Naive UTC, as Optuna stores it: SQLite has no time zones and PostgreSQL would convert.
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SearchRow(Base):
    __tablename__ = "hwprune_searches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    study_name: Mapped[str] = mapped_column(String(200), nullable=False)
    config_json: Mapped[str] = mapped_column(Text, nullable=False)
    base_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    space_fingerprint: Mapped[str] = mapped_column(String(16), nullable=False)
    space_json: Mapped[str] = mapped_column(Text, nullable=False)
    base_json: Mapped[str] = mapped_column(Text, nullable=False)
    versions_json: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class ArtifactRow(Base):
    """An ONNX artifact made by a search, by sha256 and size; its bytes are in the artifact store
    (``search.storage.artifacts``), never in the database."""

    __tablename__ = "hwprune_artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class MeasurementRow(Base):
    """The latency cache: one row per architecture x profile settings x reference model."""

    __tablename__ = "hwprune_measurements"
    __table_args__ = (
        UniqueConstraint("signature", "profile_fingerprint", "reference_sha256",
                         name="uq_hwprune_measurements_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    signature: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    profile: Mapped[str] = mapped_column(String(100), nullable=False)
    profile_fingerprint: Mapped[str] = mapped_column(String(16), nullable=False)
    # "" for an unpaired measurement; else the artifact it was timed interleaved with.
    reference_sha256: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    artifact_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    median_us: Mapped[float] = mapped_column(Float, nullable=False)
    p10_us: Mapped[float] = mapped_column(Float, nullable=False)
    p90_us: Mapped[float] = mapped_column(Float, nullable=False)
    mean_us: Mapped[float] = mapped_column(Float, nullable=False)
    stdev_us: Mapped[float] = mapped_column(Float, nullable=False)
    n: Mapped[int] = mapped_column(Integer, nullable=False)
    ci_low_us: Mapped[float] = mapped_column(Float, nullable=False)
    ci_high_us: Mapped[float] = mapped_column(Float, nullable=False)
    ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    ratio_ci_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    ratio_ci_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    converged: Mapped[bool] = mapped_column(Boolean, nullable=False)
    backend: Mapped[str] = mapped_column(String(50), nullable=False)
    backend_version: Mapped[str] = mapped_column(String(50), nullable=False)
    device: Mapped[str] = mapped_column(String(200), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class AgentRow(Base):
    """A remote profiler: its token is stored as a sha256 hash, never in clear."""

    __tablename__ = "hwprune_agents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    profile: Mapped[str] = mapped_column(String(100), nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    # "agent" measures jobs of its profile; "reader" may only read searches through the hub.
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="agent", server_default="agent")
    revoked: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    jobs_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    environment_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class JobRow(Base):
    """One measurement to be made by an agent: queued -> leased -> done | failed. A ``batch``
    job is many (a lookup table's layers and plans, ``payload_json``), made in one lease."""

    __tablename__ = "hwprune_jobs"
    __table_args__ = (
        UniqueConstraint("signature", "profile_fingerprint", "reference_sha256",
                         name="uq_hwprune_jobs_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    profile: Mapped[str] = mapped_column(String(100), nullable=False, index=True)
    profile_fingerprint: Mapped[str] = mapped_column(String(16), nullable=False)
    signature: Mapped[str] = mapped_column(String(64), nullable=False)
    artifact_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    reference_sha256: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    lease_agent_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=3)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The last well-formed but implausible result, with why it was not trusted (never cached).
    flagged_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    done_by_agent_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # "measure" (one artifact) or "batch" (its BatchSpec in payload_json; progress: measurements
    # done so far, from the agent's heartbeats).
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="measure", server_default="measure")
    payload_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)


class LatencyModelRow(Base):
    """A latency model's fitted state (JSON), one row per saved version: searches, workers and the
    hub share it through the database."""

    __tablename__ = "hwprune_latency_models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_hwprune_latency_models_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    kind: Mapped[str] = mapped_column(String(50), nullable=False)
    profile: Mapped[str] = mapped_column(String(100), nullable=False)
    profile_fingerprint: Mapped[str] = mapped_column(String(16), nullable=False)
    base_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    n_samples: Mapped[int] = mapped_column(Integer, nullable=False)
    held_out_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    state_json: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
