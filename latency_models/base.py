"""The latency backend contract and the measurement it returns."""

from __future__ import annotations

import abc
import hashlib
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from hardware_profiles import HardwareProfile
from latency_models.errors import ArtifactError, MeasurementError
from latency_models.stats import summarize
from latency_models.timing import Runner, time_paired, time_runs


@dataclass(frozen=True, slots=True)
class Measurement:
    """Latency statistics of one ONNX artifact on one profile, and where they were taken.

    Every duration is in microseconds; ``ci_low_us``/``ci_high_us`` bound the median at 95%.
    ``settings_fingerprint`` hashes the profile's timing settings with the backend version and
    the device, so that a cached figure is reused only where it would be measured the same way.
    """

    profile: str
    backend: str
    backend_version: str
    device: str
    threads: int | None
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    stdev_us: float
    n: int
    ci_low_us: float
    ci_high_us: float
    converged: bool
    elapsed_s: float
    artifact_sha256: str
    settings_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class MeasurementResult:
    """One measurement as it travels: from the backend (or an agent, over the wire) to the
    measurement store and back to the meter. ``ratio`` and ``ratio_ci`` (its 95% interval) are
    the candidate's latency over the reference's, for a paired measurement; None otherwise."""

    measurement: Measurement
    ratio: float | None = None
    ratio_ci: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class PairedMeasurement:
    """A candidate timed interleaved with a reference: the latency ratio and its 95% interval."""

    candidate: Measurement
    reference: Measurement
    ratio: float
    ratio_ci_low: float
    ratio_ci_high: float
    n_pairs: int
    converged: bool

    def result(self) -> MeasurementResult:
        """The candidate's figures with the ratio: what a meter stores and an agent posts."""
        return MeasurementResult(self.candidate, self.ratio, (self.ratio_ci_low, self.ratio_ci_high))

    def to_dict(self) -> dict[str, Any]:
        data = self.candidate.to_dict()
        data.update(
            ratio=self.ratio,
            ratio_ci=[self.ratio_ci_low, self.ratio_ci_high],
            n_pairs=self.n_pairs,
            ratio_converged=self.converged,
            reference=self.reference.to_dict(),
        )
        return data


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise ArtifactError(f"model file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read model file {str(path)!r}: {exc.strerror}") from exc
    return digest.hexdigest()


def cpu_name() -> str:
    """The CPU's marketing name and core count, e.g. ``Intel(R) Xeon(R) Processor x2``."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


class LatencyBackend(abc.ABC):
    """A way to time an ONNX model on one kind of hardware. The contract for every backend:

    * Construction is cheap and never imports the backend's library. ``open()`` imports it and
      checks the device, raising ``BackendUnavailable`` with one line that says what to install;
      ``close()`` frees what ``open()`` took. Backends are context managers doing just that.
    * ``load(artifact)`` builds what is needed to run the model (a session, an engine) with the
      profile's settings and random inputs drawn from a fixed seed, and returns a ``Runner``.
      Everything that is not inference (building, input creation, host/device copies that the
      profile excludes) happens there, outside the timer.
    * A ``Runner`` call runs one inference, synchronously, and returns its duration in
      nanoseconds as measured by the backend's own clock (host ``perf_counter_ns`` around a
      blocking call on CPU; CUDA events on GPU).
    * ``measure()`` and ``measure_paired()`` are shared: warm-up, timed runs and adaptive stopping
      follow the profile (``latency_models.timing``), so every backend reports the same statistics.
    * A backend instance is not thread safe: one measurement at a time.

    Errors: ``ArtifactError`` for a model the backend cannot load (exit status 2),
    ``MeasurementError`` for a failure while running it (exit status 1).
    """

    name: ClassVar[str] = ""

    def __init__(self, profile: HardwareProfile) -> None:
        self.profile = profile

    def open(self) -> None:  # noqa: B027 - a default, not an abstract method
        """Import the backend's library and check the device. Default: nothing to do."""

    def close(self) -> None:  # noqa: B027 - a default, not an abstract method
        """Release what ``open()`` acquired. Default: nothing to do."""

    def __enter__(self) -> LatencyBackend:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @abc.abstractmethod
    def load(self, artifact: Path) -> Runner:
        """Prepare ``artifact`` for timing and return its runner (see the class contract)."""

    @abc.abstractmethod
    def version(self) -> str:
        """The version of the library that runs the model."""

    @abc.abstractmethod
    def device(self) -> str:
        """A human-readable name of the device the model runs on."""

    def threads(self) -> int | None:
        """The number of threads the backend runs a model with, when it decides that."""
        return self.profile.threads

    def settings_fingerprint(self) -> str:
        """Hash of the profile's timing settings, the library version and the device."""
        blob = f"{self.profile.fingerprint()}|{self.name}|{self.version()}|{self.device()}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def measure(self, artifact: Path) -> Measurement:
        """Time ``artifact`` alone with the profile's warm-up and stopping policy."""
        sha = file_sha256(artifact)
        run = self.load(artifact)
        runs = time_runs(
            run,
            warmup=self.profile.warmup,
            repeat=self.profile.repeat,
            timeout_s=self.profile.timeout_s,
        )
        return self._measurement(sha, runs.durations_us, runs.converged, runs.elapsed_s)

    def measure_paired(self, candidate: Path, reference: Path) -> PairedMeasurement:
        """Time ``candidate`` interleaved with ``reference`` and report their latency ratio."""
        cand_sha, ref_sha = file_sha256(candidate), file_sha256(reference)
        cand_run = self.load(candidate)
        ref_run = self.load(reference)
        runs = time_paired(
            cand_run,
            ref_run,
            warmup=self.profile.warmup,
            repeat=self.profile.repeat,
            timeout_s=self.profile.timeout_s,
        )
        ratio = summarize(runs.ratios)
        return PairedMeasurement(
            candidate=self._measurement(cand_sha, runs.candidate_us, runs.converged, runs.elapsed_s),
            reference=self._measurement(ref_sha, runs.reference_us, runs.converged, runs.elapsed_s),
            ratio=ratio.median,
            ratio_ci_low=ratio.ci_low,
            ratio_ci_high=ratio.ci_high,
            n_pairs=ratio.n,
            converged=runs.converged,
        )

    def _measurement(
        self, sha: str, durations_us: tuple[float, ...], converged: bool, elapsed_s: float
    ) -> Measurement:
        if not durations_us:
            raise MeasurementError("the backend returned no timed runs")
        summary = summarize(durations_us)
        return Measurement(
            profile=self.profile.name,
            backend=self.name,
            backend_version=self.version(),
            device=self.device(),
            threads=self.threads(),
            median_us=summary.median,
            p10_us=summary.p10,
            p90_us=summary.p90,
            mean_us=summary.mean,
            stdev_us=summary.stdev,
            n=summary.n,
            ci_low_us=summary.ci_low,
            ci_high_us=summary.ci_high,
            converged=converged,
            elapsed_s=elapsed_s,
            artifact_sha256=sha,
            settings_fingerprint=self.settings_fingerprint(),
        )
