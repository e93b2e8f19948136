"""Progress of long steps: reported to an installed reporter, silent without one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import search.api as hw
from search import progress
from tests.search_tests.test_api import PLUGIN


class Recorder:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, int | None]] = []
        self.steps: dict[str, int] = {}

    @contextmanager
    def __call__(self, description: str, total: int | None) -> Iterator[Any]:
        self.tasks.append((description, total))
        self.steps[description] = 0

        def advance(steps: int = 1) -> None:
            self.steps[description] += steps

        yield advance


def test_tasks_reach_the_reporter_and_nothing_without_one() -> None:
    recorder = Recorder()
    with progress.task("unseen", total=2) as advance:
        advance(1)  # no reporter: nothing happens
    with progress.reporting(recorder), progress.task("seen", total=3) as advance:
        advance(1)
        advance(2)
    assert recorder.tasks == [("seen", 3)] and recorder.steps == {"seen": 3}


def test_search_reports_its_base_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             fast_profile_path: Path) -> None:
    (tmp_path / "small_progress.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    recorder = Recorder()
    settings = hw.Settings(db=f"sqlite:///{tmp_path / 'p.db'}", profiles_dirs=(fast_profile_path.parent,),
                           cache=tmp_path / "cache")
    with progress.reporting(recorder):
        status = hw.run_search({"name": "p", "model": "small_progress:bundle", "targets": ["fast"], "trials": 2,
                                "recovery": {"steps": 0}}, settings=settings)
    assert status.summary.completed == 2
    [(description, total)] = [t for t in recorder.tasks if t[0].startswith("measuring the base model")]
    assert total == 1 and recorder.steps[description] == 1
