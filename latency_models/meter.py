"""A target's latency for a search's trials: the cache first, else the target's backend in this
process (``LocalMeter``), or a job that a remote agent serves (``RemoteMeter``). ``make_meter``
chooses between them from the profile's location; callers only see ``Meter``.

Every candidate is timed interleaved with the base model (paired mode) and its latency reported
as ``ratio x base median``: on a shared machine the ratio is steady where absolute medians drift
(docs/benchmarks.md). The base median is measured once, when the search is created.

Measuring is two-phase (``start`` then ``Pending.result``) so that the jobs of several remote
targets run on their devices at the same time.
"""

from __future__ import annotations

import abc
import hashlib
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from hardware_profiles import HardwareProfile
from latency_models import registry
from latency_models.base import LatencyBackend, Measurement, MeasurementResult
from latency_models.device_lock import DeviceLock
from latency_models.errors import MeasurementError, MeasurementTimeout
from latency_models.store import JobStatus, MeasurementKey, MeasurementStore


@dataclass(frozen=True, slots=True)
class BaseArtifact:
    """The search's base model: every trial is timed paired with it. ``path`` is its ONNX file
    here (a remote agent fetches it by ``sha256`` instead)."""

    path: Path
    sha256: str
    signature: str


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


class Meter(abc.ABC):
    """One target's measurements, paired with the base model, through the store's cache.

    A meter is a context manager: entering it opens what measuring needs (a local backend).
    ``start`` answers the base model itself and cached architectures at once; anything else is
    measured by the subclass. ``background`` says whether ``start`` returns while the
    measurement runs elsewhere (start those first, so that every device works at once).
    """

    background: ClassVar[bool] = False

    def __init__(self, profile: HardwareProfile, store: MeasurementStore, base: BaseArtifact, *,
                 base_median_us: float | None = None) -> None:
        self.profile = profile
        self.store = store
        self.base = base
        self._base_median_us = base_median_us

    def __enter__(self) -> Meter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    @property
    def lock_waited_s(self) -> float:
        """Seconds this meter's measurements waited for their device (a local meter's lock)."""
        return 0.0

    @property
    def base_median_us(self) -> float:
        """The base model's median on this target, which every trial's ratio multiplies."""
        if self._base_median_us is None:
            raise RuntimeError(f"meter for {self.profile.name!r} made without the base model's median")
        return self._base_median_us

    def start(self, artifact: Path, sha256: str, signature: str) -> Pending:
        """Begin measuring ``artifact`` (architecture ``signature``); ``result()`` gives it."""
        if signature == self.base.signature:
            return _done(self._latency(self.base_median_us, 1.0, (1.0, 1.0), cached=True))
        key = MeasurementKey(signature, self.profile.fingerprint(), self.base.sha256)
        hit = self.store.find_measurement(key)
        if hit is not None and hit.ratio is not None:
            return _done(self._latency(hit.measurement.median_us, hit.ratio, hit.ratio_ci, cached=True))
        return self._start_paired(artifact, sha256, key, confirmation=0)

    def confirm(self, artifact: Path, sha256: str, signature: str, *, session: int) -> Pending:
        """Measure ``artifact`` again in a fresh paired session, bypassing and not reading the
        cache: the confirmation of a figure that a front would show (``session`` counts from 1)."""
        if signature == self.base.signature:
            return _done(self._latency(self.base_median_us, 1.0, (1.0, 1.0), cached=True))
        key = MeasurementKey(signature, self.profile.fingerprint(), self.base.sha256)
        return self._start_paired(artifact, sha256, key, confirmation=session)

    @abc.abstractmethod
    def measure_base(self) -> Measurement:
        """The base model alone on this target: the median every trial's ratio multiplies."""

    @abc.abstractmethod
    def _start_paired(self, artifact: Path, sha256: str, key: MeasurementKey, *, confirmation: int) -> Pending:
        """Measure ``artifact`` paired with the base; a confirmation (``confirmation > 0``) is a
        new, independent session whose figures never answer a later ``start``."""

    def _latency(self, median_us: float, ratio: float, ratio_ci: tuple[float, float] | None,
                 *, cached: bool) -> TargetLatency:
        return TargetLatency(self.profile.name, ratio * self.base_median_us, ratio,
                             ratio_ci or (ratio, ratio), median_us, cached)

    def _paired_latency(self, result: MeasurementResult, *, cached: bool, source: str) -> TargetLatency:
        if result.ratio is None:
            raise MeasurementError(f"{source} has no ratio to the base model")
        return self._latency(result.measurement.median_us, result.ratio, result.ratio_ci, cached=cached)


class LocalMeter(Meter):
    """Measures with the target's backend in this process, here and now (the local CPU or GPU
    is not shared between targets). With a ``lock`` (the device's, see
    ``latency_models.device_lock``) every timing holds the device exclusively, so that model work
    of other workers on the same device never runs inside the timing window."""

    def __init__(self, profile: HardwareProfile, store: MeasurementStore, base: BaseArtifact, *,
                 base_median_us: float | None = None, lock: DeviceLock | None = None) -> None:
        super().__init__(profile, store, base, base_median_us=base_median_us)
        self._backend: LatencyBackend | None = None
        self.lock = lock

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

    def _opened(self) -> LatencyBackend:
        if self._backend is None:
            raise RuntimeError("LocalMeter used outside its context")
        return self._backend

    @property
    def lock_waited_s(self) -> float:
        """Seconds this meter's measurements waited for the device (0 without a lock)."""
        return 0.0 if self.lock is None else self.lock.waited_s

    def _holding(self) -> AbstractContextManager[None]:
        return nullcontext() if self.lock is None else self.lock.exclusive()

    def measure_base(self) -> Measurement:
        backend = self._opened()
        # Every trial's latency is a ratio times this median: take the middle of three
        # measurements so that one disturbed run does not scale the whole search.
        with self._holding():
            runs = sorted((backend.measure(self.base.path) for _ in range(3)), key=lambda m: m.median_us)
        return runs[1]

    def _start_paired(self, artifact: Path, sha256: str, key: MeasurementKey, *, confirmation: int) -> Pending:
        # Each call loads both models into new sessions: a confirmation is an independent session.
        with self._holding():
            result = self._opened().measure_paired(artifact, self.base.path).result()
        if not confirmation:
            result = self.store.put_measurement(key, result)
        return _done(self._paired_latency(result, cached=False, source="local measurement"))


class RemoteMeter(Meter):
    """Measures through a job in the store's queue, served by an agent via the hub."""

    background = True

    def __init__(self, profile: HardwareProfile, store: MeasurementStore, base: BaseArtifact, *,
                 base_median_us: float | None = None, poll_s: float = 0.2) -> None:
        super().__init__(profile, store, base, base_median_us=base_median_us)
        self.poll_s = poll_s

    def measure_base(self) -> Measurement:
        key = MeasurementKey(self.base.signature, self.profile.fingerprint())
        job_id = self.store.submit_job(key, profile=self.profile.name, artifact_sha256=self.base.sha256)
        return self._wait(job_id).measurement

    def _start_paired(self, artifact: Path, sha256: str, key: MeasurementKey, *, confirmation: int) -> Pending:
        if confirmation:
            # Jobs are keyed by architecture; a confirmation gets a fresh key of its own (a hash,
            # to fit the column) so that it is a new job, never an earlier session's answer again.
            # The hub files its result in the cache under that key, where no architecture looks.
            fresh = f"{key.signature}:confirm:{confirmation}:{uuid.uuid4().hex}"
            key = MeasurementKey(hashlib.sha256(fresh.encode()).hexdigest(), key.profile_fingerprint,
                                 key.reference_sha256)
        job_id = self.store.submit_job(key, profile=self.profile.name, artifact_sha256=sha256)

        def wait() -> TargetLatency:
            return self._paired_latency(self._wait(job_id), cached=False, source=f"agent result for job {job_id}")

        return Pending(wait)

    def _wait(self, job_id: int) -> MeasurementResult:
        """Poll a job until done; its result. Failure and timeout raise ``MeasurementError``."""
        name, timeout_s = self.profile.name, self.profile.timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.store.job_state(job_id)
            if job is None:
                raise MeasurementError(f"job {job_id} vanished from the queue")
            if job.status is JobStatus.DONE and job.result is not None:
                return job.result
            if job.status is JobStatus.FAILED:
                raise MeasurementError(f"remote measurement on {name!r} failed: {job.error}")
            if time.monotonic() > deadline:
                raise MeasurementTimeout(
                    f"no agent finished job {job_id} on {name!r} within the profile's timeout of "
                    f"{timeout_s:g} s (status {job.status.value}); check `hwprune agents list`"
                )
            time.sleep(self.poll_s)


def make_meter(profile: HardwareProfile, store: MeasurementStore, base: BaseArtifact, *,
               base_median_us: float | None = None, poll_s: float = 0.2,
               lock: DeviceLock | None = None) -> Meter:
    """The meter for ``profile``: measured here when the profile's location is ``local``, by a
    remote agent through the store's job queue when it is ``remote``. Enter it before use.

    Args:
        profile: the target.
        store: the measurement cache and job queue.
        base: the base model every trial is paired with.
        base_median_us: the base model's median on this target (from ``measure_base`` when the
            search was created); needed by ``start`` and ``confirm``, not by ``measure_base``.
        poll_s: how often a remote meter looks for its job's result.
        lock: the lock of the device a local profile measures on (``measurement_device``); its
            measurements then hold the device exclusively. Ignored for a remote profile.
    """
    if profile.location == "remote":
        return RemoteMeter(profile, store, base, base_median_us=base_median_us, poll_s=poll_s)
    return LocalMeter(profile, store, base, base_median_us=base_median_us, lock=lock)
