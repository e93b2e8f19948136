"""Hostile and careless YAML: every file reader (profiles, plans, search configs) stays bounded in
memory and time, and refuses in one short line that names the file."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hardware_profiles import InvalidProfileError, load_profile_file
from hardware_profiles.loader import MAX_YAML_BYTES
from search.config import load_search_config
from search.errors import ConfigError, PlanError
from search.pipeline.plan import Plan


def alias_bomb(levels: int = 7, fan: int = 10) -> str:
    """``fan ** levels`` strings once expanded, from a few hundred bytes (a 'billion laughs')."""
    lines = ['a0: &a0 "lol"']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * fan)}]")
    lines.append(f"batch_size: *a{levels}")
    return "\n".join(lines) + "\n"


def _readers() -> dict[str, Callable[[Path], object]]:
    return {
        "profile": load_profile_file,
        "plan": Plan.load,
        "config": lambda path: load_search_config(path, {}),
    }


ERRORS = (InvalidProfileError, PlanError, ConfigError)


def _refusal(kind: str, path: Path) -> str:
    started = time.perf_counter()
    with pytest.raises(ERRORS) as info:
        _readers()[kind](path)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert "\n" not in message and len(message) < 1200, message[:300]
    return message


@pytest.mark.parametrize("kind", ["profile", "plan", "config"])
def test_alias_bomb_is_refused_quickly_in_one_line(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 600
    message = _refusal(kind, path)
    assert "bomb.yaml" in message and "aliases" in message


@pytest.mark.parametrize("kind", ["profile", "plan", "config"])
def test_small_alias_use_still_works_but_values_are_never_printed_whole(kind: str, tmp_path: Path) -> None:
    # Under the node cap, yet the refused value is 4,000 strings: the message shows a few.
    path = tmp_path / "wide.yaml"
    path.write_text('a: &a ["' + "x" * 50 + '"]\nb: &b [' + ", ".join(["*a"] * 40) + "]\n"
                    "batch_size: [" + ", ".join(["*b"] * 100) + "]\n")
    message = _refusal(kind, path)
    assert "wide.yaml" in message and "xxxxx" * 30 not in message


@pytest.mark.parametrize("kind", ["profile", "plan", "config"])
def test_not_utf8_too_big_too_deep_and_endless_files(kind: str, tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"description: caf\xe9\n")
    assert "not UTF-8" in _refusal(kind, latin)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested" in _refusal(kind, deep)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_YAML_BYTES // 10 + 10))
    assert "larger than" in _refusal(kind, big)
    if Path("/dev/zero").exists():
        assert "larger than" in _refusal(kind, Path("/dev/zero"))
    assert "is a folder" in _refusal(kind, tmp_path)


@pytest.mark.parametrize("kind", ["profile", "plan", "config"])
def test_duplicate_keys_are_refused(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("channels: {}\nchannels: {}\nbatch_size: 2\nbatch_size: 4\n")
    message = _refusal(kind, path)
    assert "appears twice" in message and "line 2" in message


def test_booleans_are_not_numbers_in_profiles(write_profile: Callable[[str, str], Path]) -> None:
    base = "backend: onnxruntime\ndevice_class: cpu\n"
    for field in ("batch_size: true", "threads: false", "warmup: {runs: true}", "timeout_s: true",
                  "repeat: {target_rel_precision: .nan}", "dim_values: {seq: 100000000}"):
        path = write_profile("strict", base + field + "\n")
        with pytest.raises(InvalidProfileError, match=r"profile strict\.yaml: field"):
            load_profile_file(path)
    assert load_profile_file(write_profile("ok", base + "batch_size: 4\ntimeout_s: 5\n")).timeout_s == 5.0
