"""The device lock across real processes: model work shares the device, a measurement has it alone
and is never starved (timestamps written by each process, compared afterwards)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hardware_profiles import HardwareProfile
from latency_models import DeviceLock, measurement_device

HOLDER = Path(__file__).with_name("lock_holder.py")


def _start(folder: Path, mode: str, count: int, hold_s: float, out: Path,
           release_when: Path | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(HOLDER), str(folder), "cpu", mode, str(count), str(hold_s), str(out)]
    if release_when is not None:
        args.append(str(release_when))
    return subprocess.Popen(args)


def _intervals(path: Path) -> list[tuple[float, float]]:
    if not path.exists():
        return []
    return [(float(a), float(b)) for a, b in (line.split() for line in path.read_text().splitlines())]


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _wait_for_lines(path: Path, lines: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_intervals(path)) < lines and time.monotonic() < deadline:
        time.sleep(0.02)


def test_model_work_in_two_processes_holds_the_device_at_once(tmp_path: Path) -> None:
    # A holds its share until B has written that it holds one too: B gets in only if sharing works.
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    a = _start(tmp_path, "shared", 1, 0, first, release_when=second)
    time.sleep(0.3)
    b = _start(tmp_path, "shared", 1, 0.05, second)
    assert b.wait(timeout=60) == 0 and a.wait(timeout=60) == 0
    (a_held,), (b_held,) = _intervals(first), _intervals(second)
    assert _overlap(a_held, b_held), (a_held, b_held)


def test_a_measurement_never_overlaps_model_work_and_is_not_starved(tmp_path: Path) -> None:
    # Two trainers keep the device busy back to back (their holds overlap, so without the gate a
    # measurement could wait for ever); three measurements must each get the device alone.
    trainers = [_start(tmp_path, "shared", 40, 0.05, tmp_path / f"train{i}.txt") for i in range(2)]
    _wait_for_lines(tmp_path / "train0.txt", 2)
    measurer = _start(tmp_path, "exclusive", 3, 0.1, tmp_path / "measure.txt")
    assert measurer.wait(timeout=60) == 0
    for trainer in trainers:
        assert trainer.wait(timeout=60) == 0
    measured = _intervals(tmp_path / "measure.txt")
    trained = _intervals(tmp_path / "train0.txt") + _intervals(tmp_path / "train1.txt")
    assert len(measured) == 3 and len(trained) == 80
    clashes = [(m, t) for m in measured for t in trained if _overlap(m, t)]
    assert not clashes, clashes
    # The measurements came in while training was still going on, not only after it ended.
    assert measured[-1][1] < max(end for _, end in trained)


def test_holds_nest_in_one_thread_and_a_measurement_inside_model_work_is_refused(tmp_path: Path) -> None:
    lock = DeviceLock(tmp_path, "cuda:0")
    with lock.shared(), lock.shared():
        with pytest.raises(RuntimeError, match="inside model work"):
            with lock.exclusive():
                pass
    with lock.exclusive(), lock.exclusive():
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cuda-0.gate", "cuda-0.lock"]


def test_a_thread_waits_for_a_measurement_in_another_process(tmp_path: Path) -> None:
    release = tmp_path / "release"
    holder = _start(tmp_path, "exclusive", 1, 0, tmp_path / "measure.txt", release_when=release)
    deadline = time.monotonic() + 30
    while not (tmp_path / "cpu.lock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the holder has the lock once the file exists and it sleeps
    lock = DeviceLock(tmp_path, "cpu")
    got: list[float] = []

    def work() -> None:
        with lock.shared():
            got.append(time.time())

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(0.3)
    assert not got, "model work started while a measurement held the device"
    release.touch()
    worker.join(timeout=30)
    assert holder.wait(timeout=30) == 0
    (held,) = _intervals(tmp_path / "measure.txt")
    assert got and got[0] >= held[1]
    assert lock.waited_s > 0.3


@pytest.mark.parametrize(("fields", "device"), [
    ({"backend": "onnxruntime", "device_class": "cpu"}, "cpu"),
    ({"backend": "onnxruntime", "device_class": "cpu", "execution_provider": "CUDAExecutionProvider",
      "provider_options": {"device_id": "1"}}, "cuda:1"),
    ({"backend": "tensorrt", "device_class": "ampere"}, "cuda:0"),
    ({"backend": "onnxruntime", "device_class": "cpu", "location": "remote"}, None),
])
def test_measurement_device_of_a_profile(fields: dict[str, object], device: str | None) -> None:
    assert measurement_device(HardwareProfile.model_validate({"name": "p", **fields})) == device
