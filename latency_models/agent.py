"""The remote profiler agent: runs on the device, pulls jobs from the hub, measures them.

It imports neither torch nor optuna (a device needs only a runtime, httpx and this package).
Each job: download the ONNX artifact (and the reference, for a paired job) by sha256, check the
bytes against the hash and with ``onnx.checker``, measure with the backend the profile names, post
the result with the environment. A ``batch`` job (a lookup table's layers and plans) is served
the same way in one lease, its progress sent with the heartbeats; a job of a kind this agent does
not know is failed with a message that says so. While measuring, a heartbeat thread keeps the
lease alive. When the hub is unreachable the agent retries with exponential backoff and keeps
any finished result until the hub takes it. On SIGTERM it finishes the job in hand, posts it and
exits; a second SIGTERM releases the job (a batch stops at its next measurement).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

from hardware_profiles import HardwareProfile
from latency_models import registry
from latency_models.base import LatencyBackend, MeasurementResult
from latency_models.batch import measure_batch
from latency_models.errors import ArtifactError, LatencyError
from latency_models.remote import HubClient, HubRefused, HubUnavailable
from latency_models.store import Outcome
from latency_models.wire import BATCH, JOB_KINDS_KEY, MEASURE, BatchResultBody, FigureBody, JobSpec, ResultBody

# The job kinds this agent runs, told to the hub in its environment.
KINDS = (MEASURE, BATCH)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Released(Exception):
    """The job was given back (second SIGTERM or lease lost): stop working on it."""


class Agent:
    """A pull loop for one profile. ``stop()`` (or SIGTERM) ends it after the job in hand."""

    def __init__(
        self,
        *,
        server: str,
        token: str,
        profile: HardwareProfile,
        work_dir: Path,
        poll_s: float = 1.0,
        heartbeat_s: float = 2.0,
        max_backoff_s: float = 30.0,
        max_jobs: int | None = None,
    ) -> None:
        self.server = server
        self.token = token
        self.profile = profile
        self.work_dir = work_dir
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.max_backoff_s = max_backoff_s
        self.max_jobs = max_jobs
        self.jobs_done = 0
        self.jobs_failed = 0  # failed here, or a result the hub refused or flagged
        self._stop = threading.Event()
        self._release = threading.Event()
        self._client = HubClient(server, token)
        self._backend: LatencyBackend | None = None
        self._progress: int | None = None  # measurements done in the batch job in hand

    # --- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def on_term(_signum: int, _frame: FrameType | None) -> None:
            if self._stop.is_set():
                logger.warning("second SIGTERM: releasing the job in hand")
                self._release.set()
            else:
                logger.warning("SIGTERM: finishing the job in hand, then exiting")
                self._stop.set()

        signal.signal(signal.SIGTERM, on_term)

    def environment(self) -> dict[str, str]:
        backend = self._backend
        return {
            "agent_profile": self.profile.name,
            "profile_fingerprint": self.profile.fingerprint(),
            "backend": self.profile.backend,
            "backend_version": backend.version() if backend else "",
            "device": backend.device() if backend else "",
            "host": platform.node(),
            "python": platform.python_version(),
            JOB_KINDS_KEY: ",".join(KINDS),
        }

    # --- loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve jobs until stopped; returns the number of jobs measured."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._backend = registry.get(self.profile.backend)(self.profile)
        self._backend.open()
        try:
            self._retry(lambda: self._client.heartbeat(environment=self.environment()))
            while not self._stop.is_set():
                job = self._retry(lambda: self._client.lease(self.profile.name))
                if job is None:
                    if self._stop.wait(self.poll_s):
                        break
                    self._retry(lambda: self._client.heartbeat())
                    continue
                self._serve(job)
                # Every job served counts, failed or not: `--max-jobs 1` means one job, then exit.
                if self.max_jobs is not None and self.jobs_done + self.jobs_failed >= self.max_jobs:
                    break
        except _Released:
            logger.warning("stopped while the hub was unreachable")
        finally:
            self._backend.close()
            self._client.close()
        return self.jobs_done

    def _retry(self, call: Callable[[], T]) -> T:
        """Call the hub until it answers; back off while it is down. 4xx errors propagate."""
        delay = 0.5
        while True:
            try:
                return call()
            except HubUnavailable as exc:
                if self._release.is_set():
                    raise _Released() from exc
                logger.warning("%s; retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(self.max_backoff_s, delay * 2)

    def _serve(self, job: JobSpec) -> None:
        logger.info("job %d: %s on %s (attempt %d)", job.id, job.artifact_sha256[:12], job.profile, job.attempt)
        lease_lost = threading.Event()
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat_loop, args=(job.id, done, lease_lost), daemon=True)
        beat.start()
        body: ResultBody | BatchResultBody
        try:
            if job.kind == MEASURE:
                body = self._measure(job)
            elif job.kind == BATCH:
                body = self._measure_batch(job, lambda: lease_lost.is_set() or self._release.is_set())
            else:
                raise LatencyError(f"this agent does not know job kind {job.kind!r} (it runs {', '.join(KINDS)}): "
                                   "update hwprune on this device")
        except (ArtifactError, LatencyError) as exc:
            done.set()
            if lease_lost.is_set() or self._release.is_set():
                if not lease_lost.is_set():
                    self._retry(lambda: self._client.release(job.id))
                logger.warning("job %d given back unfinished: %s", job.id, exc)
                return
            reason = f"{type(exc).__name__}: {exc}"
            logger.error("job %d failed: %s", job.id, reason)
            self._retry(lambda: self._client.post_failure(job.id, reason))
            self.jobs_failed += 1
            return
        finally:
            done.set()
            beat.join(timeout=10)
            self._progress = None
        if self._release.is_set() or lease_lost.is_set():
            if not lease_lost.is_set():
                self._retry(lambda: self._client.release(job.id))
            logger.warning("job %d given back unposted", job.id)
            return
        try:
            if isinstance(body, BatchResultBody):
                batch_body = body
                outcome = self._retry(lambda: self._client.post_batch_result(job.id, batch_body))
            else:
                measure_body = body
                outcome = self._retry(lambda: self._client.post_result(job.id, measure_body))
        except HubRefused as exc:
            if exc.status != 422:
                raise
            # (Hubs before issue 34's strict schema answered 422 here; today's fail the job
            # themselves and answer 409.) Say so as a failure, so the job is retried
            # (or fails) instead of waiting for its lease to expire.
            reason = f"result refused by the hub: {exc}"
            logger.error("job %d: %s", job.id, reason)
            self._retry(lambda: self._client.post_failure(job.id, reason))
            self.jobs_failed += 1
            return
        if outcome == Outcome.CONFLICT:
            logger.warning("job %d: the hub did not take the result (the job went to another agent, or the "
                           "result did not answer it and the hub failed the job)", job.id)
            return
        if outcome == Outcome.FLAGGED:
            logger.error("job %d: the hub flagged the result as implausible; it will be measured again", job.id)
            self.jobs_failed += 1
            return
        self.jobs_done += 1

    def _heartbeat_loop(self, job_id: int, done: threading.Event, lease_lost: threading.Event) -> None:
        client = HubClient(self.server, self.token)
        try:
            while not done.wait(self.heartbeat_s):
                try:
                    if client.heartbeat(job_id=job_id, progress=self._progress) is False:
                        lease_lost.set()
                except (HubUnavailable, HubRefused) as exc:
                    logger.warning("heartbeat for job %d failed: %s", job_id, exc)
        finally:
            client.close()

    def _fetch(self, sha256: str) -> Path:
        path = self.work_dir / f"{sha256}.onnx"
        if path.is_file() and _sha256(path.read_bytes()) == sha256:
            return path
        content = self._retry(lambda: self._client.artifact(sha256))
        if _sha256(content) != sha256:
            raise ArtifactError(f"artifact {sha256[:12]} arrived with another sha256: refusing it")
        _check_onnx(content, sha256)
        partial = path.with_suffix(".tmp")
        partial.write_bytes(content)
        partial.replace(path)
        return path

    def _ready_backend(self, job: JobSpec) -> LatencyBackend:
        """The open backend, once the job is known to be for this device's profile settings."""
        if job.profile_fingerprint != self.profile.fingerprint():
            raise ArtifactError(
                f"profile {job.profile!r} here has settings {self.profile.fingerprint()}, the hub "
                f"asked for {job.profile_fingerprint}: update this device's profile file"
            )
        if self._backend is None:
            raise RuntimeError("agent backend not open")
        return self._backend

    def _measure(self, job: JobSpec) -> ResultBody:
        backend = self._ready_backend(job)
        artifact = self._fetch(job.artifact_sha256)
        if job.reference_sha256:
            reference = self._fetch(job.reference_sha256)
            return ResultBody.of(backend.measure_paired(artifact, reference).result())
        return ResultBody.of(MeasurementResult(backend.measure(artifact)))

    def _measure_batch(self, job: JobSpec, stop: Callable[[], bool]) -> BatchResultBody:
        """Every layer of the batch alone and every plan paired with the base, in this lease."""
        if job.batch is None:
            raise ArtifactError(f"batch job {job.id} came without its batch")
        backend = self._ready_backend(job)
        base = self._fetch(job.artifact_sha256)
        plans = [self._fetch(sha256) for sha256 in job.batch.plans]

        def progress(done: int) -> None:
            self._progress = done

        figures = measure_batch(backend, base, job.batch.layers, plans, progress=progress, stop=stop)
        return BatchResultBody(profile=self.profile.name, backend=self.profile.backend,
                               backend_version=backend.version()[:50], device=backend.device()[:200],
                               layers_us=list(figures.layers_us),
                               plans=[FigureBody.model_validate(figure) for figure in figures.plans])


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _check_onnx(content: bytes, sha256: str) -> None:
    """Only ONNX is ever loaded here: never a pickle, whatever the hub sends."""
    import onnx

    try:
        model = onnx.load_from_string(content)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ArtifactError(f"artifact {sha256[:12]} is not a valid ONNX model: {exc}") from exc
