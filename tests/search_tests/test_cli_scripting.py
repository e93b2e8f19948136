"""Output a script can read and a person can read: trials, status, pareto with constraints,
JSON on every reporting command, consistent options; on a real search of a small plugin model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from search.cli.main import app
from search.config import CONFIG_EXAMPLE
from tests.search_tests.test_api import PLUGIN

runner = CliRunner()
FAST_PROFILE = (Path(__file__).resolve().parents[1] / "conftest.py").read_text().split('FAST_PROFILE = """\\\n')[1]
FAST_PROFILE = FAST_PROFILE.split('"""')[0]


class Search:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = f"sqlite:///{folder / 'hw.db'}"
        self.profiles = folder / "profiles"
        self.env = {"HWPRUNE_CACHE": str(folder / "cache"), "HWPRUNE_PROFILES": "", "HWPRUNE_DB": ""}

    def run(self, *args: str) -> Any:
        return runner.invoke(app, list(args), env=self.env)


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Search]:
    folder = tmp_path_factory.mktemp("scripting")
    (folder / "small_scripting.py").write_text(PLUGIN)
    search = Search(folder)
    search.profiles.mkdir()
    (search.profiles / "fast.yaml").write_text(FAST_PROFILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        # Global options after the subcommand; --trials counts the base model.
        result = search.run("search", "start", "--name", "c", "--model", "small_scripting:bundle", "-p", "fast",
                            "--trials", "5", "--recovery-steps", "0", "--objective", "pareto",
                            "--latency-budget-ratio", "0.9", "--db", search.db, "--profiles-dir", str(search.profiles),
                            "--json")
        assert result.exit_code == 0, result.output
        yield search


def test_trials_json_and_table(done: Search) -> None:
    result = done.run("search", "trials", "c", "--db", done.db, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    complete = [row for row in rows if row["state"] == "complete"]
    assert len(complete) == 5 and rows[0]["base"] is True
    for row in complete:
        assert set(row["kept"]) == {"0", "3"} and all(isinstance(v, int) for v in row["kept"].values())
        assert set(row["constraints"]) == {"latency_budget_ratio"}
        assert row["feasible"] == (row["constraints"]["latency_budget_ratio"] <= 0)
        assert row["violated"] == ([] if row["feasible"] else ["latency_budget_ratio"])
    table = done.run("search", "trials", "c", "--db", done.db)
    assert table.exit_code == 0 and "0 (base)" in table.stdout
    assert "no: latency_budget_ratio" in table.stdout  # the base model (ratio 1) is over a 0.9 budget


def test_constraints_where_optuna_dashboard_reads_them(done: Search) -> None:
    study = optuna.load_study(study_name="hwprune:c", storage=done.db)
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        # optuna-dashboard 0.21 serialises system_attrs["constraints"], a list (checked against its source).
        stored = trial.system_attrs["constraints"]
        assert stored == [trial.user_attrs["constraints"]["latency_budget_ratio"]]
        assert trial.constraints["latency_budget_ratio"] == stored[0]


def test_status_is_readable_and_counts_feasibility(done: Search) -> None:
    status = done.run("search", "status", "c", "--db", done.db)
    assert status.exit_code == 0, status.output
    text = status.stdout
    assert "{" not in text and "'" not in text  # no Python reprs
    assert "trials: 5 complete; asked for 5 completed (trial 0 is the base model)" in text
    info = json.loads(done.run("search", "status", "c", "--db", done.db, "--json").stdout)
    assert info["feasible"] + info["infeasible"] == 5 and info["infeasible"] >= 1
    assert info["infeasible_by_constraint"] == {"latency_budget_ratio": info["infeasible"]}
    assert (f"constraints (latency_budget_ratio 0.9): {info['feasible']} of 5 completed trials feasible; "
            f"infeasible: latency_budget_ratio broken by {info['infeasible']}") in text
    pareto = done.run("pareto", "c", "--db", done.db, "-p", "fast")
    assert pareto.exit_code == 0, pareto.output
    assert f"{info['feasible']} of 5 completed trials feasible" in pareto.stdout
    assert done.run("pareto", "c", "--db", done.db, "--target", "fast", "--json").exit_code == 0  # the old name


def test_export_json_force_and_manifest(done: Search) -> None:
    out = done.folder / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = done.run("export", "c", "--trial", "1", "--out", str(out), "--db", done.db)
    assert refused.exit_code == 2 and "is not empty" in refused.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(done.folder))
        result = done.run("export", "c", "--trial", "1", "--out", str(out), "--db", done.db, "--force", "--json",
                          "--profiles-dir", str(done.profiles))
    assert result.exit_code == 0, result.output
    [manifest] = json.loads(result.stdout)
    assert manifest["trial"] == 1 and manifest["finetune_steps"] == 0
    assert manifest["model_spec"] == "small_scripting:bundle"
    assert (out / "notes.txt").read_text() == "mine"


def test_missing_database_is_refused_and_not_created(done: Search) -> None:
    typo = done.folder / "typo.db"
    for args in (["search", "status", "c"], ["pareto", "c"], ["search", "trials", "c"]):
        result = done.run(*args, "--db", f"sqlite:///{typo}")
        assert result.exit_code == 2 and "no database file" in result.stderr
    # The global --db, before the subcommand, is the same option.
    assert done.run("--db", f"sqlite:///{typo}", "search", "list").exit_code == 2
    assert not typo.exists()


def test_doctor_json() -> None:
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["versions"]["optuna"] != "not installed"
    assert any(row["name"] == "onnxruntime" and row["available"] for row in data["backends"])


def test_config_schema_and_commented_example(tmp_path: Path) -> None:
    schema = json.loads(runner.invoke(app, ["search", "config", "--schema"]).stdout)
    assert {"recovery", "constraints", "targets", "trials"} <= set(schema["properties"])
    assert runner.invoke(app, ["search", "config"]).stdout.strip() == CONFIG_EXAMPLE.strip()
    page = (Path(__file__).resolve().parents[2] / "docs" / "how-to" / "plan-and-config-files.md").read_text()
    assert CONFIG_EXAMPLE.strip() in page
    path = tmp_path / "search.yaml"
    path.write_text(CONFIG_EXAMPLE)
    checked = runner.invoke(app, ["search", "config", "--check", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "ok: " in checked.stdout and "resnet-cpu" in checked.stdout


def test_plan_template_round_trip(done: Search) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(done.folder))
        result = done.run("plan", "template", "--model", "small_scripting:bundle", "-p", "fast",
                          "--profiles-dir", str(done.profiles))
    assert result.exit_code == 0, result.output
    plan = yaml.safe_load(result.stdout)
    assert plan == {"channels": {"0": 32, "3": 32}, "sparsity": {}}
    assert "# options, count (share of 32): 8 (0.25), 16 (0.5), 24 (0.75), 32 (1)" in result.stdout


def test_help_shows_defaults_uncut_and_one_name_per_concept() -> None:
    for args in (["search", "start", "--help"], ["export", "--help"], ["pareto", "--help"]):
        result = runner.invoke(app, args, terminal_width=80)
        assert result.exit_code == 0, result.output
        assert "…" not in result.stdout
        assert "--target" not in result.stdout and "-p, --profile" in result.stdout
    for group in ([], ["search"], ["plan"], ["db"], ["profiles"], ["agents"]):
        listing = runner.invoke(app, [*group, "--help"]).stdout  # off a terminal: 120 columns
        assert "..." not in listing.replace("COMMAND [ARGS]...", ""), listing  # no command's help cut short
    start = runner.invoke(app, ["search", "start", "--help"]).stdout
    text = re.sub(r"\s+", " ", start)
    assert "Default: 20" in text and "trial 0 (the dense base model) included" in text
    assert "--ignore" in text


def test_report_page_and_plots(done: Search) -> None:
    from html.parser import HTMLParser

    import numpy as np
    from matplotlib.image import imread

    out = done.folder / "report"
    result = done.run("report", "c", "--out", str(out), "--db", done.db, "--json")
    assert result.exit_code == 0, result.output
    plots = {plot["file"]: plot for plot in json.loads(result.stdout)["plots"]}
    assert set(plots) == {"front-0.png", "history.png", "channels.png", "macs.png"}
    # Every completed trial is drawn: feasible ones by how their figure was obtained, the rest as infeasible.
    front = plots["front-0.png"]["points"]
    assert sum(v for k, v in front.items() if k != "front") == 5 and front["infeasible"] >= 1
    assert plots["history.png"]["points"]["feasible"] + plots["history.png"]["points"]["infeasible"] == 5
    pareto = json.loads(done.run("pareto", "c", "--db", done.db, "--json").stdout)
    assert front["front"] == len(pareto) and plots["channels.png"]["points"]["kept"] == 2 * len(pareto)
    assert plots["macs.png"]["points"]["trials"] == 5 and "pairs of trials" in plots["macs.png"]["note"]

    class Images(HTMLParser):
        sources: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "img":
                self.sources.append(dict(attrs)["src"] or "")

    page = Images()
    page.feed((out / "index.html").read_text())
    assert sorted(page.sources) == sorted(plots)
    for name in page.sources:
        pixels = imread(out / name)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        # Not a blank canvas: markers, lines and text in several colours.
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20
    again = done.run("report", "c", "--out", str(out), "--db", done.db)
    assert again.exit_code == 2 and "is not empty" in again.stderr


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_page_renders_in_headless_chromium(done: Search, tmp_path: Path) -> None:
    """The page as a browser shows it: every plot loads and is drawn (coloured pixels on screen)."""
    import os
    import subprocess

    import numpy as np
    from matplotlib.image import imread

    browser = _chromium()
    if browser is None:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER is set but no chromium is on PATH (make test installs Debian's chromium)")
        pytest.skip("no headless chromium on PATH (Debian: apt-get install chromium)")
    out = done.folder / "report-browser"
    assert done.run("report", "c", "--out", str(out), "--db", done.db).exit_code == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--virtual-time-budget=5000"]
    page = (out / "index.html").resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") == 4
    shot = tmp_path / "page.png"
    subprocess.run([browser, *flags, "--window-size=1400,6000", f"--screenshot={shot}", page],
                   capture_output=True, text=True, timeout=120, check=True)
    pixels = imread(shot)[..., :3]
    # Text is black or grey; only the drawn plots put saturated colour on the screen. A page whose
    # images failed to load shows a broken-image icon at most.
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    coloured_rows = np.flatnonzero((saturation > 0.3).sum(axis=1) > 3)
    assert (saturation > 0.3).sum() > 1000  # about 2,600 with the plots, 120 without them
    # Colour in the upper and the lower part of the page: more than one plot was drawn.
    assert coloured_rows.size and coloured_rows.max() - coloured_rows.min() > 1000
