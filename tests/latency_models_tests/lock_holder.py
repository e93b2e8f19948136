"""A process that holds a device lock and writes when it held it: `python lock_holder.py FOLDER
DEVICE MODE COUNT HOLD_S OUT [RELEASE_WHEN]` (one "start end" line of time.time() per hold).

With RELEASE_WHEN, the first hold lasts until that file exists (at most 20 s)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from latency_models.device_lock import DeviceLock


def main(argv: list[str]) -> None:
    folder, device, mode, count, hold_s, out = argv[:6]
    release_when = Path(argv[6]) if len(argv) > 6 else None
    lock = DeviceLock(Path(folder), device)
    hold = lock.shared if mode == "shared" else lock.exclusive
    with open(out, "a") as log:
        for index in range(int(count)):
            with hold():
                started = time.time()
                if index == 0 and release_when is not None:
                    deadline = time.monotonic() + 20
                    while not release_when.exists() and time.monotonic() < deadline:
                        time.sleep(0.01)
                else:
                    time.sleep(float(hold_s))
                ended = time.time()
            log.write(f"{started} {ended}\n")
            log.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
