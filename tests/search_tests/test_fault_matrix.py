"""The fault matrix with a few kills (bench/faults.py runs 20 of each and reports the counts in
docs/benchmarks.md): real SIGKILLs of a search, of agents holding leases and of the hub with a
lease held; no completed trial or measurement lost, none duplicated."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench" / "faults.py"


def _faults() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hwprune_bench_faults", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_agents_and_hub_killed_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    counts = _faults().agent_and_hub_faults(tmp_path, agent_kills=3, hub_kills=2, seed=14)
    assert counts.kills == 3 and "2 hub kills" in counts.notes[-1], counts
    assert counts.lost == 0 and counts.duplicated == 0, counts
    assert counts.completed > 0


def test_search_killed_at_random_loses_and_duplicates_nothing(tmp_path: Path, hwprune_cache: Path) -> None:
    counts = _faults().search_faults(tmp_path, kills=2, seed=14, trials=12, delay_s=(4.0, 8.0),
                                     cache_dir=hwprune_cache)
    assert counts.kills == 2 and counts.lost == 0 and counts.duplicated == 0, counts
    assert counts.completed >= 12 and not [n for n in counts.notes if "exited" in n], counts


def test_hub_killed_mid_post_accepts_the_result_once(tmp_path: Path) -> None:
    counts = _faults().hub_killed_mid_post(tmp_path, rounds=2, seed=14)
    assert counts.kills == 2 and counts.completed == 2, counts
    assert counts.lost == 0 and counts.duplicated == 0 and counts.notes == ["0 half-sent bodies accepted"], counts
