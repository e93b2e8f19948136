"""Keep a benchmark run's markdown section and regenerate docs/benchmarks.md from the kept runs."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"


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
    """Keep this run as ``bench/results/benchmarks/<key>.md`` (the previous run of ``key`` stays in
    git history) and regenerate the benchmarks page from the kept runs."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"## {title}\n\nMeasured {stamp} on {machine()}.\nCommand: `{command}`\n\n{body.rstrip()}\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{key}.md").write_text(section)
    spec = importlib.util.spec_from_file_location("benchmarks_page", ROOT / "docs" / "_scripts" / "benchmarks_page.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("docs/_scripts/benchmarks_page.py cannot be loaded")
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    DOC.write_text(page.render())
    if key not in page.listed_runs():
        print(f"note: no benchmark in {RESULTS / 'page.yaml'} lists run {key!r}; add it there to show it "
              "(and write its reading)")
