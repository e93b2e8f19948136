"""Latency of a trial's model on each target: the cache first, else the target's backend here,
or a job for a remote agent.

Every candidate is timed interleaved with the base model (paired mode) and its latency reported
as ``ratio x base median``: on a shared machine the ratio is steady where absolute medians drift
(docs/benchmarks.md). The base median is measured once, when the search is created.

Measuring is two-phase (``start`` then ``Pending.result``) so that the jobs of several remote
targets run on their devices at the same time.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from hardware_profiles import HardwareProfile
from latency_models import LatencyBackend, Measurement, MeasurementError, MeasurementTimeout, registry
from search.errors import ConfigError
from search.storage import Repository
from search.storage.queue import DONE, FAILED, JobQueue

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TargetLatency:
    """One target's verdict on one trial."""

    target: str
    latency_us: float
    ratio: float
    ratio_ci: tuple[float, float]
    median_us: float
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_us": self.latency_us,
            "ratio": self.ratio,
            "ratio_ci": list(self.ratio_ci),
            "median_us": self.median_us,
            "cached": self.cached,
        }


class Pending:
    """A measurement under way; ``result()`` waits for it."""

    def __init__(self, wait: Callable[[], TargetLatency]) -> None:
        self._wait = wait

    def result(self) -> TargetLatency:
        return self._wait()


def _done(value: TargetLatency) -> Pending:
    return Pending(lambda: value)


class Meter:
    """One target's measurements of trials, paired with the base model, through the cache.

    ``start`` answers the base model itself and cached architectures at once; anything else
    goes to ``_start_new``, which the local and remote meters implement.
    """

    def __init__(self, profile: HardwareProfile, repo: Repository, *, base_sha256: str,
                 base_signature: str, base_median_us: float) -> None:
        self.profile = profile
        self.repo = repo
        self.base_sha256 = base_sha256
        self.base_signature = base_signature
        self.base_median_us = base_median_us

    def __enter__(self) -> Meter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def start(self, artifact: Path, sha256: str, signature: str) -> Pending:
        """Begin measuring ``artifact`` (architecture ``signature``); ``result()`` gives it."""
        if signature == self.base_signature:
            return _done(self._latency(self.base_median_us, 1.0, (1.0, 1.0), cached=True))
        fingerprint = self.profile.fingerprint()
        hit = self.repo.find_measurement(signature, fingerprint, self.base_sha256)
        if hit is not None and hit.ratio is not None:
            return _done(self._latency(hit.measurement.median_us, hit.ratio, hit.ratio_ci, cached=True))
        return self._start_new(artifact, sha256, signature, fingerprint)

    def confirm(self, artifact: Path, sha256: str, signature: str, *, session: int) -> Pending:
        """Measure ``artifact`` again in a fresh paired session, bypassing and not writing the
        cache: the confirmation of a figure that a front would show (``session`` counts from 1)."""
        if signature == self.base_signature:
            return _done(self._latency(self.base_median_us, 1.0, (1.0, 1.0), cached=True))
        return self._start_new(artifact, sha256, signature, self.profile.fingerprint(), confirmation=session)

    def _start_new(self, artifact: Path, sha256: str, signature: str, fingerprint: str, *,
                   confirmation: int = 0) -> Pending:
        raise NotImplementedError

    def _latency(self, median_us: float, ratio: float, ratio_ci: tuple[float, float] | None,
                 *, cached: bool) -> TargetLatency:
        return TargetLatency(self.profile.name, ratio * self.base_median_us, ratio,
                             ratio_ci or (ratio, ratio), median_us, cached)


class LocalMeter(Meter):
    """Measures with the target's backend in this process, here and now (the local CPU or GPU
    is not shared between targets)."""

    def __init__(self, profile: HardwareProfile, repo: Repository, *, base_path: Path, base_sha256: str,
                 base_signature: str, base_median_us: float) -> None:
        if profile.location != "local":
            raise ConfigError(f"target {profile.name!r} is remote: use RemoteMeter")
        super().__init__(profile, repo, base_sha256=base_sha256, base_signature=base_signature,
                         base_median_us=base_median_us)
        self.base_path = base_path
        self._backend: LatencyBackend | None = None

    def __enter__(self) -> LocalMeter:
        self._backend = registry.get(self.profile.backend)(self.profile)
        self._backend.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _start_new(self, artifact: Path, sha256: str, signature: str, fingerprint: str, *,
                   confirmation: int = 0) -> Pending:
        if self._backend is None:
            raise RuntimeError("LocalMeter used outside its context")
        # Each call loads both models into new sessions: a confirmation is an independent session.
        paired = self._backend.measure_paired(artifact, self.base_path)
        ratio_ci = (paired.ratio_ci_low, paired.ratio_ci_high)
        if confirmation:
            return _done(self._latency(paired.candidate.median_us, paired.ratio, ratio_ci, cached=False))
        stored = self.repo.put_measurement(
            signature=signature,
            profile_fingerprint=fingerprint,
            measurement=paired.candidate,
            reference_sha256=self.base_sha256,
            ratio=paired.ratio,
            ratio_ci=ratio_ci,
        )
        return _done(self._latency(stored.measurement.median_us, stored.ratio or paired.ratio,
                                   stored.ratio_ci or ratio_ci, cached=False))


class RemoteMeter(Meter):
    """Measures through a job in the queue, served by an agent via the hub."""

    def __init__(self, profile: HardwareProfile, repo: Repository, *, base_sha256: str, base_signature: str,
                 base_median_us: float, poll_s: float = 0.2) -> None:
        super().__init__(profile, repo, base_sha256=base_sha256, base_signature=base_signature,
                         base_median_us=base_median_us)
        self.queue = JobQueue(repo.engine)
        self.poll_s = poll_s

    def _start_new(self, artifact: Path, sha256: str, signature: str, fingerprint: str, *,
                   confirmation: int = 0) -> Pending:
        name = self.profile.name
        # Jobs are keyed by architecture; a confirmation gets a fresh key of its own (a hash, to
        # fit the column) so that it is a new job, never an earlier session's answer again. The
        # hub files its result in the cache under that key, where no architecture will look.
        key = (hashlib.sha256(f"{signature}:confirm:{confirmation}:{uuid.uuid4().hex}".encode()).hexdigest()
               if confirmation else signature)
        job_id = self.queue.submit(signature=key, profile=name, profile_fingerprint=fingerprint,
                                   artifact_sha256=sha256, reference_sha256=self.base_sha256)

        def wait() -> TargetLatency:
            result = wait_for_job(self.queue, job_id, timeout_s=self.profile.timeout_s, poll_s=self.poll_s,
                                  profile=name)
            ratio = result.get("ratio")
            if ratio is None:
                raise MeasurementError(f"agent result for job {job_id} has no ratio to the base model")
            ci = result.get("ratio_ci")
            return self._latency(float(result["measurement"]["median_us"]), float(ratio),
                                 (float(ci[0]), float(ci[1])) if ci else None, cached=False)

        return Pending(wait)


def wait_for_job(queue: JobQueue, job_id: int, *, timeout_s: float, poll_s: float, profile: str) -> dict[str, Any]:
    """Poll a job until done; its result body. Failure and timeout raise ``MeasurementError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = queue.get(job_id)
        if job is None:
            raise MeasurementError(f"job {job_id} vanished from the queue")
        if job.status == DONE and job.result is not None:
            return job.result
        if job.status == FAILED:
            raise MeasurementError(f"remote measurement on {profile!r} failed: {job.last_error}")
        if time.monotonic() > deadline:
            raise MeasurementTimeout(
                f"no agent finished job {job_id} on {profile!r} within the profile's timeout of "
                f"{timeout_s:g} s (status {job.status}); check `hwprune agents list`"
            )
        time.sleep(poll_s)


def measure_base(profile: HardwareProfile, artifact: Path, *, repo: Repository, sha256: str,
                 signature: str, poll_s: float = 0.2) -> Measurement:
    """The base model alone on a target: the reference every trial's ratio multiplies."""
    if profile.location == "local":
        with registry.get(profile.backend)(profile) as backend:
            # Every trial's latency is a ratio times this median: take the middle of three
            # measurements so that one disturbed run does not scale the whole search.
            runs = sorted((backend.measure(artifact) for _ in range(3)), key=lambda m: m.median_us)
            return runs[1]
    queue = JobQueue(repo.engine)
    job_id = queue.submit(signature=signature, profile=profile.name, profile_fingerprint=profile.fingerprint(),
                          artifact_sha256=sha256)
    result = wait_for_job(queue, job_id, timeout_s=profile.timeout_s, poll_s=poll_s, profile=profile.name)
    return Measurement(**result["measurement"])
