"""Measurement kept apart from model work on one device, across every process of a machine.

Workers that fine-tune on the device a target is timed on would otherwise put training kernels
inside the timing window. One lock file per device, under the cache, is shared by every process:
model work (a fine-tuning step, adaptive batch-norm, scoring, calibration) holds it *shared*, so
workers train side by side; a measurement holds it *exclusive*, so it waits for the steps in
flight to end and no new step starts until it is done.

``flock`` alone would let a steady stream of shared holders starve a measurement. A second file,
the gate, gives measurements priority: a measurement takes the gate exclusively and then the lock;
model work passes the gate (taken shared and let go at once) before it takes the lock, so once a
measurement waits at the gate no new model work begins.

Holding is re-entrant per thread: model work inside model work (scoring inside recovery) or a
measurement inside a measurement takes nothing more. A measurement asked for while the same thread
holds model work would wait for itself, and raises instead.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hardware_profiles import HardwareProfile

__all__ = ["DeviceLock", "measurement_device"]

# Backends that always run on the machine's first CUDA device.
_CUDA_BACKENDS = frozenset({"tensorrt", "trtexec"})
_CUDA_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


def measurement_device(profile: HardwareProfile) -> str | None:
    """The device of this machine that a profile's measurements run on (``cpu``, ``cuda:N``), or
    None for a remote profile, measured on another machine."""
    if profile.location == "remote":
        return None
    if profile.backend in _CUDA_BACKENDS:
        return "cuda:0"
    if profile.execution_provider in _CUDA_PROVIDERS:
        return f"cuda:{int(profile.provider_options.get('device_id', 0))}"
    return "cpu"


@dataclass
class _Held:
    mode: str = ""
    depth: int = 0


@dataclass
class DeviceLock:
    """The lock of one device (``cpu``, ``cuda:0``, ``mps``) in ``folder``, shared by every process
    that uses the same folder.

    ``waited_s`` adds up the seconds this object's holders waited, for a trial's stage times.
    """

    folder: Path
    device: str
    waited_s: float = 0.0
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.device).strip("-").lower()
        if not slug:
            raise ValueError(f"device name {self.device!r} has no letters or digits")
        self.folder = Path(self.folder)
        self._lock_path = self.folder / f"{slug}.lock"
        self._gate_path = self.folder / f"{slug}.gate"

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the device for model work (many holders at once; waits while a measurement runs)."""
        with self._hold("shared"):
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the device for a measurement (alone; waits for model work in flight)."""
        with self._hold("exclusive"):
            yield

    def _state(self) -> _Held:
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = _Held()
        return held

    @contextmanager
    def _hold(self, mode: str) -> Iterator[None]:
        held = self._state()
        if held.depth:
            if mode == "exclusive" and held.mode == "shared":
                raise RuntimeError(f"a measurement on {self.device} was asked for inside model work on "
                                   "the same device; it would wait for itself")
            held.depth += 1
            try:
                yield
            finally:
                held.depth -= 1
            return
        started = time.perf_counter()
        lock_fd = self._acquire(mode)
        self.waited_s += time.perf_counter() - started
        held.mode, held.depth = mode, 1
        try:
            yield
        finally:
            held.mode, held.depth = "", 0
            os.close(lock_fd)  # closing the descriptor lets go of its lock

    def _acquire(self, mode: str) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        gate_fd = os.open(self._gate_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(gate_fd, fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH)
            lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH)
            except BaseException:
                os.close(lock_fd)
                raise
        finally:
            os.close(gate_fd)  # model work lets the gate go at once; a measurement once it holds the lock
        return lock_fd
