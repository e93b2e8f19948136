"""What a meter needs from a database: the measurement cache and the remote job queue.

``MeasurementStore`` is a protocol so that this package stays free of SQL (and of ``search``):
``search.storage.Repository`` implements it on SQLite or PostgreSQL. Results travel as
``MeasurementResult`` both ways; a job's state is a ``JobStatus``, never a bare string, and so are
the hub's answers (``Outcome``) and a token's ``Role``: the hub, the queue, the client and the agent
share these enums.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from latency_models.base import MeasurementResult


class JobStatus(StrEnum):
    """A remote measurement job: ``queued -> leased -> done``, or ``failed`` past its attempts."""

    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class Outcome(StrEnum):
    """What the hub answers (``StatusBody.status``) to a posted result, failure or release, and
    what the client makes of a refusal it expects."""

    OK = "ok"  # /health
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # the same agent posted again: harmless
    FLAGGED = "flagged"  # implausible: kept on the job for inspection, never cached; measured again
    NOT_HOLDER = "not_holder"  # another agent holds (or finished) the job: HTTP 409
    UNKNOWN = "unknown"  # no such job: HTTP 404
    CONFLICT = "conflict"  # the client's name for a 409: the job went to another agent meanwhile


class Role(StrEnum):
    """What a hub token may do: an agent measures its profile's jobs; a reader reads searches."""

    AGENT = "agent"
    READER = "reader"


@dataclass(frozen=True, slots=True)
class MeasurementKey:
    """What makes two measurements interchangeable: the architecture, the profile's timing
    settings and the reference it was paired with (``""`` for an unpaired measurement)."""

    signature: str
    profile_fingerprint: str
    reference_sha256: str = ""


@dataclass(frozen=True, slots=True)
class JobState:
    """Where a remote job stands: its ``result`` once done, its ``error`` once failed."""

    id: int
    status: JobStatus
    result: MeasurementResult | None = None
    error: str | None = None


class MeasurementStore(Protocol):
    """The measurement cache and the queue of jobs for remote agents, in one database.

    Implementations are safe to share between threads and between processes on the same
    database: a key cached twice keeps the first figures, a key submitted twice is one job.
    """

    def find_measurement(self, key: MeasurementKey) -> MeasurementResult | None:
        """The cached result under ``key``, or None."""

    def put_measurement(self, key: MeasurementKey, result: MeasurementResult) -> MeasurementResult:
        """Cache ``result`` under ``key``; if another writer cached the key first, theirs is returned."""

    def submit_job(self, key: MeasurementKey, *, profile: str, artifact_sha256: str) -> int:
        """Queue a measurement of ``artifact_sha256`` on ``profile`` (paired with the key's
        reference, when it names one) for an agent, or join the job queued under ``key``;
        returns the job's id. A failed job of that key is queued again."""

    def job_state(self, job_id: int) -> JobState | None:
        """Where job ``job_id`` stands, with its result once an agent's was accepted; None
        for a job that does not exist."""
