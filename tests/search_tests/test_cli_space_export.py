"""``hwprune space`` and ``hwprune export`` through Typer's runner, on the digits example."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from search.cli.main import app

runner = CliRunner()


@pytest.fixture
def env(hwprune_cache: Path, digits_bundle: Any) -> dict[str, str]:
    return {"HWPRUNE_CACHE": str(hwprune_cache)}


def test_space_json(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["space", "--example", "digits", "--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["channel_multiple"] == 16
    assert data["output_layer"] == "fc"
    assert data["sparsity"] == []
    names = [g["name"] for g in data["groups"]]
    assert "stages.2.3.conv1" in names


def test_space_table_with_nm_target(env: dict[str, str]) -> None:
    result = runner.invoke(
        app, ["space", "--example", "digits", "-p", "cpu-ort-fp32", "-p", "ampere-trt-fp16"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "N:M eligible:" in result.stdout and "(2:4)" in result.stdout
    assert "rounded to multiples of 16" in result.stdout


def test_export_writes_onnx_state_plan_manifest(env: dict[str, str], tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"channels": {"stages.2.3.conv1": 0.5, "stages.1.3.conv1": 0.25}}))
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["export", "--example", "digits", "--plan", str(plan), "--out", str(out), "--finetune-steps", "5"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt", "model.pt2", "plan.yaml", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kept"]["stages.2.3.conv1"] == 64
    assert manifest["kept"]["stages.1.3.conv1"] == 16
    assert manifest["finetune_steps"] == 5
    measured = runner.invoke(app, ["measure", str(out / "model.onnx"), "-p", "cpu-ort-fp32", "--json"])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout)["median_us"] > 0


@pytest.mark.parametrize(
    ("plan", "extra", "message"),
    [
        ({"channels": {"stem.0": 0.5}}, [], "unknown group 'stem.0'; the space has: "),
        ({"channels": {"stages.2.3.conv1": 0.05}}, [], "must be in [0.25, 1], got 0.05"),
        ({"sparsity": {"stages.2.3.conv1": "2:4"}}, [], "unknown N:M-eligible layer"),
        ({"channels": {}}, ["--importance", "fisher"], "importance 'fisher' is unknown; choose one of"),
        ({"channels": {}}, ["--ignore", "stages.9"], "unknown layer(s) to ignore: stages.9"),
    ],
)
def test_export_bad_plans_exit_2(
    env: dict[str, str], tmp_path: Path, plan: dict[str, Any], extra: list[str], message: str
) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["export", "--example", "digits", "--plan", str(path), "--out", str(out), *extra], env=env
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not out.exists()


def test_model_source_must_be_given_once(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["space"], env=env)
    assert result.exit_code == 2
    assert "give exactly one of --example NAME or --model" in result.stderr
