"""Latency of a trial's model on each target: the cache first, else the target's backend.

Every candidate is timed interleaved with the base model (paired mode) and its latency reported
as ``ratio x base median``: on a shared machine the ratio is steady where absolute medians drift
(docs/benchmarks.md). The base median is measured once, when the search is created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from hardware_profiles import HardwareProfile
from latency_models import LatencyBackend, Measurement, registry
from search.errors import ConfigError
from search.storage import Repository

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


class TargetMeter:
    """Measures trials on one local target, paired with the base model, through the cache."""

    def __init__(
        self,
        profile: HardwareProfile,
        repo: Repository,
        *,
        base_path: Path,
        base_sha256: str,
        base_signature: str,
        base_median_us: float,
    ) -> None:
        if profile.location != "local":
            raise ConfigError(
                f"target {profile.name!r} is measured on a remote device; remote agents are not "
                "available in this hwprune release: choose a local profile"
            )
        self.profile = profile
        self.repo = repo
        self.base_path = base_path
        self.base_sha256 = base_sha256
        self.base_signature = base_signature
        self.base_median_us = base_median_us
        self._backend: LatencyBackend | None = None

    def __enter__(self) -> TargetMeter:
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

    def measure(self, artifact: Path, signature: str) -> TargetLatency:
        """The latency of ``artifact`` (architecture ``signature``) on this target."""
        name = self.profile.name
        if signature == self.base_signature:
            return TargetLatency(name, self.base_median_us, 1.0, (1.0, 1.0), self.base_median_us, True)
        fingerprint = self.profile.fingerprint()
        hit = self.repo.find_measurement(signature, fingerprint, self.base_sha256)
        if hit is not None and hit.ratio is not None:
            return self._latency(hit.measurement, hit.ratio, hit.ratio_ci, cached=True)
        if self._backend is None:
            raise RuntimeError("TargetMeter used outside its context")
        paired = self._backend.measure_paired(artifact, self.base_path)
        ratio_ci = (paired.ratio_ci_low, paired.ratio_ci_high)
        stored = self.repo.put_measurement(
            signature=signature,
            profile_fingerprint=fingerprint,
            measurement=paired.candidate,
            reference_sha256=self.base_sha256,
            ratio=paired.ratio,
            ratio_ci=ratio_ci,
        )
        return self._latency(stored.measurement, stored.ratio or paired.ratio,
                             stored.ratio_ci or ratio_ci, cached=False)

    def _latency(
        self, measurement: Measurement, ratio: float, ratio_ci: tuple[float, float] | None, *, cached: bool
    ) -> TargetLatency:
        return TargetLatency(
            target=self.profile.name,
            latency_us=ratio * self.base_median_us,
            ratio=ratio,
            ratio_ci=ratio_ci or (ratio, ratio),
            median_us=measurement.median_us,
            cached=cached,
        )


def measure_base(profile: HardwareProfile, artifact: Path) -> Measurement:
    """The base model alone on a local target: the reference every trial's ratio multiplies."""
    if profile.location != "local":
        raise ConfigError(
            f"target {profile.name!r} is measured on a remote device; remote agents are not "
            "available in this hwprune release: choose a local profile"
        )
    with registry.get(profile.backend)(profile) as backend:
        return backend.measure(artifact)
