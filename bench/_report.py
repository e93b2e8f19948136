"""Write a benchmark's markdown section into docs/benchmarks.md, stamped with machine and date."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, Python {platform.python_version()}"


def write_section(key: str, title: str, command: str, body: str) -> None:
    """Replace (or append) the section ``key`` of the benchmarks page."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- {key}:start -->\n## {title}\n\n"
        f"Measured {stamp} on {machine()}.\nCommand: `{command}`\n\n{body.rstrip()}\n"
        f"<!-- {key}:end -->\n"
    )
    header = "# Benchmarks\n\nEvery figure here was measured by the command shown with it.\n\n"
    text = DOC.read_text() if DOC.exists() else header
    pattern = re.compile(rf"<!-- {key}:start -->.*?<!-- {key}:end -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
