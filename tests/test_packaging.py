"""The distribution: the wheel built from this tree installs and migrates a database on its own,
and the extras split the light agent install from the search.

``test_wheel_installs_and_migrates`` builds the wheel (``pip wheel --no-deps``, no network),
installs it with ``--no-deps --no-index`` into a new, empty venv, and lets that venv see this
one's site-packages through a ``.pth`` line for the dependencies (a line, not a site dir, so this
venv's editable hwprune is not activated). It proves that the wheel carries every package and
the migrations, and that ``hwprune db upgrade`` runs from the installed package with no source
tree in sight; it does not prove that pip resolves the dependencies from an index.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

from search.cli._app import EXTRA_OF_MODULE
from search.storage import head_revision

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Distribution names whose import name differs.
IMPORT_NAME = {"torch-pruning": "torch_pruning", "scikit-learn": "sklearn", "pyyaml": "yaml"}


def _names(requirements: list[str]) -> set[str]:
    found = set()
    for requirement in requirements:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
        if name != "hwprune":
            found.add(IMPORT_NAME.get(name, name.replace("-", "_")))
    return found


def test_every_package_is_in_the_wheel_list() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    in_tree = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("search", "latency_models", "hardware_profiles")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert listed == in_tree | {"search.storage.migrations", "search.storage.migrations.versions"}


def test_extras_split_the_agent_from_the_search() -> None:
    """The base and the ``agent`` extra bring no torch, optuna or database; every module the CLI
    names as coming with an extra is installed by that extra (the agent tests block exactly the
    ``search`` extra's modules, see ``AGENT_LAUNCHER`` in conftest)."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    base, agent, search = _names(project["dependencies"]), _names(extras["agent"]), _names(extras["search"])
    assert {"onnxruntime", "httpx", "onnx"} <= agent
    assert not (base | agent) & {"torch", "torch_pruning", "optuna", "sqlalchemy", "alembic", "fastapi"}
    assert "hwprune[agent]" in extras["search"] and "hwprune[search]" in extras["dev"]
    assert {m for m, e in EXTRA_OF_MODULE.items() if e == "agent"} == agent
    assert {m for m, e in EXTRA_OF_MODULE.items() if e == "search"} == search | {"starlette"}  # fastapi's own


def _build_wheel(out: Path) -> Path:
    # Built from a copy, so that setuptools' build/ and egg-info never land in the tree.
    source = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("search", "latency_models", "hardware_profiles", "alembic"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for file in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / file, source / file)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out)], check=True, capture_output=True)
    (wheel,) = out.glob("hwprune-*.whl")
    return wheel


@pytest.mark.packaging
@pytest.mark.timeout(120)
def test_wheel_installs_and_migrates(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_bytes(archive.read(next(n for n in names if n.endswith("/METADATA"))))
    assert "search/storage/migrations/env.py" in names
    assert "search/storage/migrations/versions/0001_initial.py" in names
    assert "hardware_profiles/cpu-ort-fp32.yaml" in names
    unconditional = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert not _names(unconditional) & {"torch", "optuna", "sqlalchemy"}

    # Nothing of this tree may leak in: no PYTHONPATH (pip would take a source tree's egg-info for
    # an installed hwprune), no database or store settings.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HWPRUNE_DB", "HWPRUNE_ARTIFACTS")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--ignore-installed", "-q", str(wheel)], check=True, capture_output=True, env=env)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run = tmp_path / "elsewhere"
    run.mkdir()

    where = subprocess.run([str(python), "-c", "import search.storage.migrate as m; print(m.ALEMBIC_DIR)"],
                           cwd=run, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where) == site / "search" / "storage" / "migrations"

    database = run / "fresh.db"
    upgraded = subprocess.run([str(venv / "bin" / "hwprune"), "db", "upgrade", "--db", f"sqlite:///{database}"],
                              cwd=run, env=env, capture_output=True, text=True, timeout=60)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"schema empty -> {head_revision()}" in upgraded.stdout
    current = subprocess.run([str(venv / "bin" / "hwprune"), "db", "current", "--db", f"sqlite:///{database}"],
                             cwd=run, env=env, capture_output=True, text=True, timeout=60)
    assert current.stdout.strip() == f"database {head_revision()}, expected {head_revision()}"


def test_a_command_without_its_extra_names_it(agent_launcher: str, tmp_path: Path) -> None:
    """On an agent-only install (the ``search`` extra's modules blocked), a search command is one
    line naming the extra to install, exit status 2, and the agent command still loads."""
    refused = subprocess.run([sys.executable, "-c", agent_launcher, "search", "list", "--db",
                              f"sqlite:///{tmp_path / 'x.db'}"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().startswith("error: this command needs ")
    assert "pip install 'hwprune[search]'" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert subprocess.run([sys.executable, "-c", agent_launcher, "agent", "--help"], capture_output=True,
                          timeout=120).returncode == 0
