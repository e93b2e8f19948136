"""Latency measurement: backends, statistics and the registry that names them.

Importing this package registers every built-in backend. It never imports torch, optuna or
``search``: the remote agent runs on devices that have only a runtime and this package.
"""

from __future__ import annotations

from latency_models import ort as _ort  # noqa: F401  (registers "onnxruntime")
from latency_models import trt as _trt  # noqa: F401  (registers "tensorrt")
from latency_models import trtexec as _trtexec  # noqa: F401  (registers "trtexec")
from latency_models.base import (
    LatencyBackend,
    Measurement,
    MeasurementResult,
    PairedMeasurement,
    cpu_name,
    file_sha256,
)
from latency_models.device_lock import DeviceLock, measurement_device
from latency_models.errors import (
    ArtifactError,
    BackendUnavailable,
    LatencyError,
    MeasurementError,
    MeasurementTimeout,
    RegistryError,
    UnknownBackendError,
)
from latency_models.meter import BaseArtifact, LocalMeter, Meter, Pending, RemoteMeter, TargetLatency, make_meter
from latency_models.registry import get, names, register
from latency_models.stats import Summary, coefficient_of_variation, summarize
from latency_models.store import JobState, JobStatus, MeasurementKey, MeasurementStore
from latency_models.timing import Runner

__all__ = [
    "ArtifactError",
    "BackendUnavailable",
    "BaseArtifact",
    "DeviceLock",
    "JobState",
    "JobStatus",
    "LatencyBackend",
    "LatencyError",
    "LocalMeter",
    "Measurement",
    "MeasurementError",
    "MeasurementKey",
    "MeasurementResult",
    "MeasurementStore",
    "MeasurementTimeout",
    "Meter",
    "PairedMeasurement",
    "Pending",
    "RegistryError",
    "RemoteMeter",
    "Runner",
    "Summary",
    "TargetLatency",
    "UnknownBackendError",
    "coefficient_of_variation",
    "cpu_name",
    "file_sha256",
    "get",
    "make_meter",
    "measurement_device",
    "names",
    "register",
    "summarize",
]
