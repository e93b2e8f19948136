"""The benchmarks page is generated from the kept results and says where each figure comes from."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "_scripts" / "benchmarks_page.py"


def _page_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_page", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_is_what_the_kept_results_give() -> None:
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_each_benchmark_has_one_section_with_date_command_and_reading() -> None:
    page = _page_module()
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    spec = page._spec()
    titles = [b["title"] for b in spec["benchmarks"]]
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections == [*titles, "Earlier runs"]  # one section per benchmark, none twice
    for benchmark in spec["benchmarks"]:
        runs = [(page.RESULTS / f"{key}.md").read_text() for key in benchmark["runs"]]
        for run in runs:
            assert re.search(r"20\d\d-\d\d-\d\d", run), "a run says when it was measured"
            assert "Command" in run or re.search(r"`[^`]*(bench/|hwprune )[^`]*`", run), "and by what command"
        in_run = benchmark.get("reading_in_run")
        assert benchmark.get("reading") or in_run and any(in_run in run for run in runs), benchmark["title"]


def test_a_run_not_on_the_page_is_named_as_an_earlier_run() -> None:
    page = _page_module()
    kept = {p.stem for p in page.RESULTS.glob("*.md")} - {"earlier-readings"}
    earlier = kept - page.listed_runs()
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    tail = text[text.index("## Earlier runs"):]
    assert earlier and all(f"`{key}.md`" in tail for key in earlier)
