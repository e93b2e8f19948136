"""The device that model work runs on: adaptive batch-norm, fine-tuning, calibration, scoring.

Measurement never runs here: it stays with the target's backend. The user names the device
(``--device``, config ``device:``): ``auto`` takes the first CUDA device, else Apple's MPS, else
the CPU, and says so when it falls back; ``cuda``, ``cuda:N`` and ``mps`` are refused in one line
where that device does not exist, never quietly replaced by the CPU.

Replays must give the very same weights (``export`` checks a trial's sha256), so a GPU runs
with torch's deterministic algorithms, cuDNN's autotuner off and cuBLAS's fixed workspace (which
cuBLAS reads once, when it starts: ``resolve_device`` sets it before any CUDA work). The CPU path
is left as it always was: its kernels are deterministic for a fixed thread count, and stored
searches replay unchanged.
"""

from __future__ import annotations

import copy
import os
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from latency_models import DeviceLock
from search.config import DEVICE_PATTERN, cpu_count
from search.errors import ConfigError

Kind = Literal["cpu", "cuda", "mps"]

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
_PATTERN = re.compile(DEVICE_PATTERN)
# cuBLAS's documented setting for reproducible results (CUDA 10.2 and later).
CUBLAS_WORKSPACE = ":4096:8"


def check_device_name(text: str) -> str:
    """``text`` if it names a device kind hwprune knows (``ConfigError`` otherwise)."""
    if not _PATTERN.match(text):
        raise ConfigError(f"device must be {DEVICE_HELP}, got {text!r}")
    return text


@dataclass(frozen=True)
class ModelDevice:
    """Where a search's model work runs.

    Attributes:
        requested: what the user asked for (``auto``, ``cpu``, ``cuda:1``, ...).
        name: the torch device that runs it (``cpu``, ``cuda:0``, ``mps``).
        note: why ``auto`` chose it, when it fell back; empty otherwise.
        lock: the device's lock shared with measurements on the same device (see
            ``latency_models.device_lock``); None keeps no lock.
    """

    requested: str
    name: str
    note: str = ""
    lock: DeviceLock | None = field(default=None, compare=False)

    @property
    def kind(self) -> Kind:
        kind = self.name.split(":")[0]
        return "cuda" if kind == "cuda" else "mps" if kind == "mps" else "cpu"

    @property
    def torch(self) -> torch.device:
        return torch.device(self.name)

    def work(self) -> AbstractContextManager[None]:
        """Hold the device for one piece of model work (shared with other workers' model work,
        never inside a measurement on the same device)."""
        return nullcontext() if self.lock is None else self.lock.shared()

    def with_lock(self, lock: DeviceLock | None) -> ModelDevice:
        return ModelDevice(self.requested, self.name, self.note, lock)


CPU = ModelDevice("cpu", "cpu")


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(requested: str) -> ModelDevice:
    """The device ``requested`` names on this machine (``ConfigError`` where it does not exist)."""
    check_device_name(requested)
    cuda = _cuda_count()
    if requested == "auto":
        if cuda:
            return _prepared(ModelDevice(requested, "cuda:0"))
        if _mps_available():
            return ModelDevice(requested, "mps")
        return ModelDevice(requested, "cpu", "device auto: no CUDA or MPS device here, model work runs on the CPU")
    if requested == "cpu":
        return CPU
    if requested == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' is not available here (torch sees no Apple GPU); "
                              "use --device cpu or --device auto")
        return ModelDevice(requested, "mps")
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if index >= cuda:
        seen = f"{cuda} CUDA device{'s' if cuda != 1 else ''}" if cuda else "no CUDA device"
        build = f" (torch {torch.__version__}{'' if torch.version.cuda else ', a CPU build'})"
        raise ConfigError(f"device {requested!r} is not available: torch sees {seen}{build}; "
                          "use --device cpu or --device auto")
    return _prepared(ModelDevice(requested, f"cuda:{index}"))


def _prepared(device: ModelDevice) -> ModelDevice:
    # cuBLAS reads its workspace setting when it starts; set it before any CUDA work begins.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    return device


def replay_device(recovered_on: str, requested: str | None, *, trial: int) -> ModelDevice:
    """The device that re-materialises a trial recovered on ``recovered_on``: the same kind of
    device (its weights are reproducible there and nowhere else), ``requested`` choosing which.

    Raises:
        ConfigError: ``requested`` is another kind of device, or this machine has none of that kind.
    """
    kind = recovered_on.split(":")[0]
    if requested is not None:
        chosen = resolve_device(requested)
        if chosen.kind != kind:
            raise ConfigError(f"trial {trial} was recovered on {recovered_on}; re-making it on {chosen.name} would "
                              f"give other weights than the ones measured: use --device {kind} (or a {kind}:N)")
        return chosen
    if kind == "cpu":
        return CPU
    try:
        return resolve_device(kind)
    except ConfigError:
        raise ConfigError(f"trial {trial} was recovered on {recovered_on} and this machine has no {kind} device; "
                          f"its weights can only be reproduced on one: run this where there is one "
                          f"(--device {kind}:N picks it)") from None


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads fixed at ``count`` inside, restored after: float reductions split
    by thread count, so work that must replay bit-identically runs at a fixed count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def deterministic(device: ModelDevice) -> Iterator[dict[str, Any]]:
    """Model work on ``device`` that replays bit-identically; yields the switches it set.

    On a GPU: torch's deterministic algorithms, cuDNN deterministic and not autotuned, and the
    cuBLAS workspace checked (set by ``resolve_device``). On the CPU nothing changes.
    """
    if device.kind == "cpu":
        yield {}
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    if device.kind == "cuda" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        raise ConfigError("CUBLAS_WORKSPACE_CONFIG must be :4096:8 or :16:8 for reproducible GPU recovery, "
                          f"got {os.environ.get('CUBLAS_WORKSPACE_CONFIG')!r}; unset it and run again")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield {"deterministic_algorithms": True, "cudnn_deterministic": True, "cudnn_benchmark": False,
               "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")}
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (a tensor, tuple, list or mapping) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=False)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(to_device(item, device) for item in value)
    if isinstance(value, list):
        return [to_device(item, device) for item in value]
    return value


class OnDevice:
    """An iterable of batches read from ``batches`` and moved to ``device`` one at a time."""

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[Any]:
        return (to_device(batch, self.device) for batch in self.batches)


def on_device(batches: Iterable[Any], device: ModelDevice) -> Iterable[Any]:
    """``batches`` as ``device`` reads them: unchanged on the CPU (so loaders keep their kind)."""
    return batches if device.kind == "cpu" else OnDevice(batches, device.torch)


def move_model(model: nn.Module, device: ModelDevice) -> nn.Module:
    """``model`` on ``device`` (in place; a no-op on the CPU, where every model starts)."""
    return model if device.kind == "cpu" else model.to(device.torch)


# The dense model on each device, copied once per process: distillation's teacher and the
# reference of output-fidelity errors. The user's model itself never moves.
_TEACHERS: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def teacher_on(model: nn.Module, device: ModelDevice) -> nn.Module:
    """``model`` itself on the CPU; elsewhere a copy of it on ``device``, made once."""
    if device.kind == "cpu":
        return model
    copies = _TEACHERS.setdefault(model, {})
    if device.name not in copies:
        copies[device.name] = copy.deepcopy(model).to(device.torch).eval()
    return copies[device.name]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device ``hwprune doctor`` lists."""

    name: str
    detail: str


def available_devices() -> list[DeviceInfo]:
    """Every device model work could run on here, the CPU first."""
    found = [DeviceInfo("cpu", f"{cpu_count()} cores for this process, torch {torch.__version__}")]
    for index in range(_cuda_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(DeviceInfo(f"cuda:{index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                                 f"compute capability {props.major}.{props.minor}"))
    if _mps_available():
        found.append(DeviceInfo("mps", "Apple GPU (Metal Performance Shaders)"))
    return found
