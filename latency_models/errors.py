"""Errors of the latency side. Each carries the CLI exit status it maps to."""

from __future__ import annotations


class LatencyError(Exception):
    """Base of every latency error; a failure at run time (exit status 1) unless a subclass says."""

    exit_code = 1


class RegistryError(LatencyError):
    """A backend name registered twice: a packaging bug, not user input."""


class UnknownBackendError(LatencyError):
    """A profile names a backend that no module registered."""

    exit_code = 2


class BackendUnavailable(LatencyError):
    """The backend exists but cannot run here (library missing, no device)."""

    exit_code = 2


class ArtifactError(LatencyError):
    """The model file is missing, not ONNX, or not loadable by the backend."""

    exit_code = 2


class MeasurementError(LatencyError):
    """The backend failed while timing a model that it had loaded."""


class MeasurementTimeout(MeasurementError):
    """A measurement took longer than its profile's ``timeout_s``."""
