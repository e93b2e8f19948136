"""Issue 34's hostile command lines, one test each: a user's mistake is exit status 2, one `error:`
line naming the input and the fix, and nothing stored. In-process through the Typer app where the
case allows; in a subprocess where the process itself is the point (a plugin that hangs or exits)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from search.cli.main import app

runner = CliRunner()


def one_line_exit_2(result: Any, *needles: str) -> str:
    """The contract: status 2, one `error:` line on stderr naming what is wrong, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return str(lines[0])


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder: a refused command must leave it as empty as it found it."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def _stored(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- option parsing: Typer's usage errors are one line -----------------------------------------

USAGE_CASES = {
    "workers-0": (["search", "start", "--example", "digits", "--workers", "0"], ("--workers", "search start --help")),
    "trials-abc": (["search", "start", "--example", "digits", "--trials", "abc"], ("--trials",)),
    "final-steps-negative": (["search", "start", "--example", "digits", "--final-steps", "-1"], ("--final-steps",)),
    "max-failures-0": (["search", "start", "--example", "digits", "--max-failures", "0"], ("--max-failures",)),
    "samples-negative": (["latency-model", "build", "--samples", "-1"], ("--samples",)),
    "min-age-negative": (["db", "prune-artifacts", "--min-age", "-1"], ("--min-age",)),
    "unknown-command": (["search", "statu"], ("statu", "search --help")),
    "unknown-option": (["--bogus"], ("--bogus",)),
}


@pytest.mark.parametrize("case", USAGE_CASES)
def test_usage_errors_are_one_line(case: str, workdir: Path) -> None:
    args, needles = USAGE_CASES[case]
    one_line_exit_2(runner.invoke(app, args), *needles)
    assert _stored(workdir) == []


# --- search start: values refused before a search row is written ---------------------------------

CONFIG_CASES = {
    "seed-negative": (["--seed", "-1"], ("seed", "greater than or equal to 0")),
    "seed-2**70": (["--seed", str(2**70)], ("seed", "4294967295")),
    "budget-inf": (["--latency-budget-us", "inf"], ("latency_budget_us", "finite")),
    "timeout-nan": (["--timeout", "nan"], ("timeout_s", "finite")),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_search_start_refuses_before_storing(case: str, workdir: Path) -> None:
    args, needles = CONFIG_CASES[case]
    db = workdir / "s.db"
    result = runner.invoke(app, ["search", "start", "--name", "x", "--example", "digits", "--trials", "2",
                                 "--db", f"sqlite:///{db}", *args])
    one_line_exit_2(result, *needles)
    assert _stored(workdir) == []


@pytest.mark.parametrize(("yaml_line", "field"), [
    ("trials: true", "trials"), ("seed: '3'", "seed"), ("sensitivity_start: 1", "sensitivity_start"),
    ("recovery: {steps: true}", "recovery.steps"), ("constraints: {error_ceiling: true}", "error_ceiling"),
])
def test_config_types_are_strict(yaml_line: str, field: str, workdir: Path) -> None:
    config = workdir.parent / "search.yaml"
    config.write_text(f"name: x\nexample: digits\n{yaml_line}\n")
    result = runner.invoke(app, ["search", "start", "--config", str(config), "--db", f"sqlite:///{workdir / 's.db'}"])
    one_line_exit_2(result, "search.yaml", field)
    assert _stored(workdir) == []


def test_api_still_takes_tuples() -> None:
    from search.api import search_config

    assert search_config(name="x", example="digits", keep_ratios=(0.5, 1.0)).keep_ratios == [0.5, 1.0]


# --- --db: a URL that can never work is the user's to fix ---------------------------------------

def _bad_db(kind: str, tmp_path: Path) -> tuple[str, str]:
    """A --db of the given kind and a word its error must name."""
    if kind == "not-a-url":
        return "not a url", "not a database URL"
    if kind == "folder":
        (tmp_path / "adir").mkdir()
        return f"sqlite:///{tmp_path / 'adir'}", "folder"
    if kind == "missing-folder":
        return f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}", "does not exist"
    if kind == "not-a-database":
        (tmp_path / "notes.db").write_text("these are my notes\n")
        return f"sqlite:///{tmp_path / 'notes.db'}", "not a SQLite database"
    assert kind == "driver-missing"
    return "mysql://user@localhost/hwprune", "driver is not installed"


DB_COMMANDS = {
    "search-start": ["search", "start", "--name", "x", "--example", "digits", "--trials", "2"],
    "serve": ["serve", "--port", "0"],
    "db-upgrade": ["db", "upgrade"],
}


@pytest.mark.parametrize("command", DB_COMMANDS)
@pytest.mark.parametrize("kind", ["not-a-url", "folder", "missing-folder", "not-a-database", "driver-missing"])
def test_unusable_db_is_exit_2(command: str, kind: str, tmp_path: Path, workdir: Path) -> None:
    url, needle = _bad_db(kind, tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    one_line_exit_2(runner.invoke(app, [*DB_COMMANDS[command], "--db", url]), "--db", needle)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if kind == "not-a-database":
        assert (tmp_path / "notes.db").read_text() == "these are my notes\n"


def test_db_current_does_not_create_a_missing_file(workdir: Path) -> None:
    one_line_exit_2(runner.invoke(app, ["db", "current", "--db", "sqlite:///missing.db"]), "missing.db")
    assert _stored(workdir) == []


# --- serve and agents ---------------------------------------------------------------------------

@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_serve_on_a_port_in_use_is_one_line(busy_port: int, workdir: Path) -> None:
    result = runner.invoke(app, ["serve", "--port", str(busy_port), "--db", f"sqlite:///{workdir / 'hub.db'}"])
    one_line_exit_2(result, f"127.0.0.1:{busy_port}", "--port")
    assert _stored(workdir) == []


def test_agents_add_refuses_a_local_profile(workdir: Path) -> None:
    result = runner.invoke(app, ["agents", "add", "dev", "-p", "cpu-ort-fp32", "--db", f"sqlite:///{workdir / 'a.db'}"])
    one_line_exit_2(result, "cpu-ort-fp32", "location: remote")
    assert _stored(workdir) == []


# --- plugins that hang or exit: the process itself is the point ---------------------------------

PLUGINS = {
    "hangs-at-import": ("import time\ntime.sleep(3600)\n", ("did not finish importing", "HWPRUNE_PLUGIN_TIMEOUT_S")),
    "hangs-in-function": ("import time\ndef bundle():\n    time.sleep(3600)\n",
                          ("did not finish building", "within 2 s")),
    "exits-at-import": ("import sys\nsys.exit(0)\n", ("sys.exit(0)", "importing")),
    "exits-in-function": ("import sys\ndef bundle():\n    sys.exit(0)\n", ("sys.exit(0)", "must return")),
}


@pytest.mark.parametrize("case", PLUGINS)
def test_plugin_that_hangs_or_exits_is_reported(case: str, tmp_path: Path) -> None:
    source, needles = PLUGINS[case]
    module = f"plugin_{case.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "HWPRUNE_PLUGIN_TIMEOUT_S": "2"}
    done = subprocess.run([sys.executable, "-m", "search", "space", "--model", f"{module}:bundle"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and module in lines[0], done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- scripting: JSON that strict parsers read, help from the registries --------------------------

def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} is not JSON (RFC 8259)")


def test_latency_model_eval_json_is_strict_json(tmp_path: Path) -> None:
    # issue 34: a model fitted on 6 samples has an unbounded conformal quantile, printed as Infinity
    import torch
    from torch import nn

    from latency_models.predictors.learned import LearnedModel
    from search.pipeline.features import architecture_features
    from search.storage import Repository
    from search.storage.predictor_store import LatencyModelStore

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    base = architecture_features(model, torch.randn(1, 3, 8, 8))
    fitted = LearnedModel(base)
    fitted.fit([(base, 0.5 + 0.05 * i) for i in range(6)])
    url = f"sqlite:///{tmp_path / 'lm.db'}"
    repo = Repository(url)
    LatencyModelStore(repo.engine).save("six", fitted, profile="cpu-ort-fp32", profile_fingerprint="f" * 16,
                                        base_fingerprint="b")
    repo.close()
    result = runner.invoke(app, ["latency-model", "eval", "six", "-p", "cpu-ort-fp32", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout, parse_constant=_no_constants)
    assert data["samples"] == 6 and data["held_out"]["quantile"] is None


@pytest.mark.parametrize("command", [["space"], ["export"], ["plan", "template"],
                                     ["latency-model", "build"], ["predict"], ["search", "start"]])
def test_help_names_every_built_in_example(command: list[str]) -> None:
    from search.examples import EXAMPLES

    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    line = " ".join(result.stdout.split())
    assert "--example" in line and all(name in line for name in EXAMPLES), line
