"""The error contract through the real CLI: a user's mistake is exit status 2 and one line naming
the input and the fix; nothing a user can type reaches "internal error"; `serve` and `agent` too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from hardware_profiles.loader import MAX_YAML_DEPTH
from search.cli.main import app
from search.storage import Repository
from search.storage.queue import QUEUED, JobQueue
from tests.search_tests.test_user_errors import one_line_exit_2 as _one_line_exit_2

runner = CliRunner()

TINY_PLUGIN = (Path(__file__).parent / "tiny_plugin.py").read_text()


def alias_bomb(levels: int = 7, fan: int = 10) -> str:
    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"name: *a{levels}"]) + "\n"


def _identity_model(path: Path, dims: list[int | str]) -> Path:
    shape = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [shape], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Modules named for this test: one good, and three broken in the ways users break them."""
    tag = tmp_path.name.replace("-", "_")
    (tmp_path / f"tiny_{tag}.py").write_text(TINY_PLUGIN)
    (tmp_path / f"raises_{tag}.py").write_text("raise RuntimeError('needs the GPU cluster mounted')\n")
    (tmp_path / f"syntax_{tag}.py").write_text("def bundle(:\n    pass\n")
    (tmp_path / f"factory_{tag}.py").write_text("def bundle():\n    return {}['weights']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tag


@pytest.fixture
def mistakes(tmp_path: Path, plugins: str, fast_profile_path: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """Mistaken command lines, each with the words its one-line error must name."""
    profiles = ["--profiles-dir", str(fast_profile_path.parent)]
    huge = _identity_model(tmp_path / "huge.onnx", [100_000, 100_000, 100_000])
    symbolic = _identity_model(tmp_path / "symbolic.onnx", ["batch", "seq", 4096])
    (fast_profile_path.parent / "long.yaml").write_text(
        fast_profile_path.read_text() + "batch_size: 65536\ndim_values: {seq: 1000000}\n")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"backend: onnxruntime\ndevice_class: cpu\ndescription: caf\xe9\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * (MAX_YAML_DEPTH + 5) + "]" * (MAX_YAML_DEPTH + 5) + "\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    plan = tmp_path / "plan.yaml"
    plan.write_text("channels: {}\n")
    typo = f"sqlite:///{tmp_path / 'typo.db'}"
    return {
        "measure-huge": ([*profiles, "measure", str(huge), "-p", "fast"], ("huge.onnx", "GiB")),
        "measure-symbolic": ([*profiles, "measure", str(symbolic), "-p", "long"],
                             ("symbolic.onnx", "batch_size or dim_values")),
        "profile-alias-bomb": (["profiles", "validate", str(bomb)], ("bomb.yaml", "aliases")),
        "profile-latin1": (["profiles", "validate", str(latin)], ("latin.yaml", "UTF-8")),
        "profile-deep": (["profiles", "validate", str(deep)], ("deep.yaml", "nested")),
        "config-alias-bomb": (["search", "start", "--config", str(bomb), "--db", f"sqlite:///{tmp_path / 'c.db'}"],
                              ("bomb.yaml",)),
        "plan-alias-bomb": (["export", "--plan", str(bomb), "--example", "digits", "--out", str(tmp_path / "o")],
                            ("bomb.yaml",)),
        "out-is-a-file": (["export", "--plan", str(plan), "--example", "digits", "--out", str(a_file)],
                          ("a-file", "is a file")),
        "out-under-a-file": (["export", "--plan", str(plan), "--example", "digits", "--out", str(a_file / "sub")],
                             ("cannot create --out", "a-file")),
        "plugin-raises": (["space", "--model", f"raises_{plugins}:bundle"], ("raises_", "RuntimeError", "GPU cluster")),
        "plugin-syntax": (["space", "--model", f"syntax_{plugins}:bundle"], ("syntax_", "syntax error")),
        "plugin-factory-raises": (["space", "--model", f"factory_{plugins}:bundle"], ("factory_", "KeyError")),
        "agent-not-a-url": (["agent", "--server", "not a url", "-p", "cpu-ort-fp32", "--token", "t"],
                            ("--server", "http")),
        "agent-file-url": (["agent", "--server", "file:///etc/passwd", "-p", "cpu-ort-fp32", "--token", "t"],
                           ("--server",)),
        "status-typo-db": (["search", "status", "x", "--db", typo], ("typo.db", "--db")),
        "list-typo-db": (["search", "list", "--db", typo], ("typo.db",)),
        "pareto-typo-db": (["pareto", "x", "--db", typo], ("typo.db",)),
        "agents-typo-db": (["agents", "list", "--db", typo], ("typo.db",)),
        "serve-missing-cert": (["serve", "--db", f"sqlite:///{tmp_path / 's.db'}", "--ssl-certfile",
                                str(tmp_path / "nope.pem")], ("nope.pem", "no such file")),
        "serve-cert-not-pem": (["serve", "--db", f"sqlite:///{tmp_path / 's.db'}", "--ssl-certfile", str(a_file)],
                               ("a-file", "TLS certificate")),
    }


MISTAKES = ["measure-huge", "measure-symbolic", "profile-alias-bomb", "profile-latin1", "profile-deep",
            "config-alias-bomb", "plan-alias-bomb", "out-is-a-file", "out-under-a-file", "plugin-raises",
            "plugin-syntax", "plugin-factory-raises", "agent-not-a-url", "agent-file-url", "status-typo-db",
            "list-typo-db", "pareto-typo-db", "agents-typo-db", "serve-missing-cert", "serve-cert-not-pem"]


@pytest.mark.parametrize("case", MISTAKES)
def test_user_mistakes_are_one_line_exit_2(
        case: str, mistakes: dict[str, tuple[list[str], tuple[str, ...]]], tmp_path: Path) -> None:
    args, needles = mistakes[case]
    started = time.perf_counter()
    _one_line_exit_2(runner.invoke(app, args), *needles)
    assert time.perf_counter() - started < 30, args
    assert not (tmp_path / "typo.db").exists()


def test_every_mistake_is_a_case(mistakes: dict[str, tuple[list[str], tuple[str, ...]]]) -> None:
    assert sorted(mistakes) == sorted(MISTAKES)


def test_db_upgrade_at_an_unknown_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'future.db'}"
    Repository(url).close()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE hwprune_alembic_version SET version_num = '0099'"))
    engine.dispose()
    _one_line_exit_2(runner.invoke(app, ["db", "upgrade", "--db", url]), "0099", "upgrade hwprune")
    _one_line_exit_2(runner.invoke(app, ["serve", "--db", url]), "0099", "upgrade hwprune")


def test_serve_with_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    # a folder that does not exist is the user's to fix (issue 34): exit 2
    result = runner.invoke(app, ["serve", "--db", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}"])
    _one_line_exit_2(result, "dir.db", "does not exist")


def test_database_errors_carry_no_sql_dump(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    Repository(f"sqlite:///{path}").close()
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    result = runner.invoke(app, ["agents", "add", "orin", "-p", "jetson-orin-ort-cpu", "--db", read_only])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "readonly database" in result.stderr
    assert "[SQL:" not in result.stderr and "INSERT" not in result.stderr and "sqlalche.me" not in result.stderr


def _study_version(url: str, version: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": version})
    engine.dispose()


def test_refused_resume_keeps_the_stored_budget(tmp_path: Path, plugins: str, hwprune_cache: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    env = {"HWPRUNE_CACHE": str(hwprune_cache)}
    started = runner.invoke(app, ["search", "start", "--name", "r", "--model", f"tiny_{plugins}:bundle",
                                  "--trials", "1", "--recovery-steps", "1", "--db", url, "--json"], env=env)
    assert started.exit_code == 0, started.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _study_version(url, "v0.1.0.a")  # an Optuna schema this Optuna refuses
    resumed = runner.invoke(app, ["search", "resume", "r", "--trials", "9", "--db", url], env=env)
    assert resumed.exit_code != 0 and len(resumed.stderr.strip().splitlines()) == 1, resumed.output
    assert "[SQL:" not in resumed.stderr
    repo = Repository(url)
    assert repo.get_search("r").config.trials == 1  # the refused resume changed nothing
    repo.close()


def test_agent_with_max_jobs_1_exits_after_its_failed_job(
    tmp_path: Path, start_hub: Callable[..., Any], standin_profiles: Path,
    spawn_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    import hashlib

    from hardware_profiles import load_profile

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    repo = Repository(url)
    queue = JobQueue(repo.engine)
    profile = load_profile("jetson-orin-ort-cpu", [standin_profiles])
    content = b"this is not an ONNX model"
    sha = hashlib.sha256(content).hexdigest()
    repo.put_artifact(sha, content)
    job = queue.submit(signature="s", profile=profile.name, profile_fingerprint=profile.fingerprint(),
                       artifact_sha256=sha)
    hub = start_hub(url)
    agent = spawn_agent(hub.url, queue.add_agent("orin", profile.name), profile.name, standin_profiles,
                        "--max-jobs", "1")
    assert agent.wait(timeout=90) == 0
    stored = queue.get(job)
    assert stored is not None and stored.status == QUEUED and stored.attempts == 1
    assert "not a valid ONNX model" in (stored.last_error or "")
    repo.close()


def test_agent_gives_up_at_once_on_an_unusable_server(agent_launcher: str, tmp_path: Path) -> None:
    env = {**os.environ, "HWPRUNE_CACHE": str(tmp_path), "HWPRUNE_AGENT_TOKEN": "t"}
    for server in ("file:///etc/passwd", "ftp://hub.example", "not a url", "http://"):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", agent_launcher, "agent", "--server", server,
                               "-p", "cpu-ort-fp32"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (server, done.stderr)
        assert done.stderr.strip().startswith("error: --server") and "Traceback" not in done.stderr
        assert time.perf_counter() - started < 30


def test_hub_client_refuses_an_unusable_url_without_retrying() -> None:
    from latency_models.remote import HubClient, HubRefused

    client = HubClient("file:///etc", "t")
    with pytest.raises(HubRefused, match="unusable"):
        client.heartbeat()
    client.close()
