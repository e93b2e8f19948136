"""Remote targets end to end: the hub on real HTTP, two real agent subprocesses (with torch and
optuna made unimportable), on SQLite and PostgreSQL. The agents serve ``jetson-orin-ort-cpu`` with
ONNX Runtime on this machine's CPU: a loopback stand-in for a Jetson, named so in its profile."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from typer.testing import CliRunner

from latency_models import file_sha256
from search.cli.main import app
from search.storage import Repository
from search.storage.queue import DONE, JobQueue

PROFILE = "jetson-orin-ort-cpu"
runner = CliRunner()


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _completed(db_url: str, name: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            study = optuna.load_study(study_name=f"hwprune:{name}", storage=db_url)
        except KeyError:
            return 0
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _hub_with_two_agents(db_url: str, profiles: Path, start_hub: Callable[..., Any],
                         spawn_agent: Callable[..., subprocess.Popen[bytes]]) -> tuple[Any, JobQueue]:
    hub = start_hub(db_url)
    queue = JobQueue(Repository(db_url).engine)
    for name in ("orin-1", "orin-2"):
        spawn_agent(hub.url, queue.add_agent(name, PROFILE), PROFILE, profiles)
    _wait(lambda: len(queue.live_agents(PROFILE, 60)) == 2, 60, "two live agents")
    return hub, queue


def _env(hwprune_cache: Path, profiles: Path) -> dict[str, str]:
    return {"HWPRUNE_CACHE": str(hwprune_cache), "HWPRUNE_PROFILES": str(profiles),
            "HWPRUNE_HEARTBEAT_S": "1", "HWPRUNE_GRACE_S": "3"}


def test_agent_path_imports_neither_torch_nor_optuna(agent_launcher: str) -> None:
    """The launcher blocks torch and optuna: the agent command still loads and refuses cleanly."""
    ok = subprocess.run([sys.executable, "-c", agent_launcher, "agent", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([sys.executable, "-c", agent_launcher, "agent", "--server", "http://127.0.0.1:9",
                              "--profile", PROFILE], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "HWPRUNE_AGENT_TOKEN"})
    assert refused.returncode == 2 and "give --token or set HWPRUNE_AGENT_TOKEN" in refused.stderr
    blocked = subprocess.run([sys.executable, "-c", agent_launcher.replace("from search.cli.main import main",
                              "import optuna"), "x"], capture_output=True, text=True)
    assert blocked.returncode != 0 and "optuna is blocked" in blocked.stderr  # the block is real


def test_search_without_live_agent_is_refused(
    db_url: str, digits_bundle: Any, hwprune_cache: Path, standin_profiles: Path
) -> None:
    result = runner.invoke(app, ["search", "start", "--name", "x", "--example", "digits", "-p", PROFILE,
                                 "--trials", "2", "--db", db_url], env=_env(hwprune_cache, standin_profiles))
    assert result.exit_code == 2
    assert f"no live agent serves remote profile '{PROFILE}'" in result.stderr
    assert f"hwprune agents add NAME --profile {PROFILE}" in result.stderr
    assert Repository(db_url).list_searches() == []


def test_remote_search_completes(
    db_url: str, digits_bundle: Any, hwprune_cache: Path, standin_profiles: Path,
    start_hub: Callable[..., Any], spawn_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    hub, queue = _hub_with_two_agents(db_url, standin_profiles, start_hub, spawn_agent)
    env = _env(hwprune_cache, standin_profiles)
    result = runner.invoke(app, ["search", "start", "--name", "remote", "--example", "digits",
                                 "-p", PROFILE, "-p", "cpu-ort-fp32", "--trials", "4",
                                 "--recovery-steps", "3", "--db", db_url, "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["search"]["completed"] == 4
    jobs = queue.jobs()
    assert jobs and all(job.status == DONE for job in jobs)
    assert sum(a.jobs_done for a in queue.list_agents()) == len(jobs)
    # Every job's architecture was measured exactly once, and its result is in the cache.
    assert len({(j.signature, j.profile_fingerprint, j.reference_sha256) for j in jobs}) == len(jobs)
    repo = Repository(db_url)
    for job in jobs:
        assert repo.find_measurement(job.key) is not None
    for row in report["pareto"]:
        assert set(row["latency_us"]) == {PROFILE, "cpu-ort-fp32"}
    devices = {(a.environment or {}).get("device") for a in queue.list_agents()}
    assert all(devices)


def test_killed_agent_job_is_finished_by_the_other(
    db_url: str, tmp_path: Path, standin_profiles: Path, onnx_artifact: Path, onnx_artifact_wide: Path,
    start_hub: Callable[..., Any], spawn_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    slow = standin_profiles.parent / "slow-profiles"
    slow.mkdir()
    # Long measurements (3 s, never converging early) so the kill lands mid-job.
    (slow / f"{PROFILE}.yaml").write_text((standin_profiles / f"{PROFILE}.yaml").read_text().replace(
        "max_runs: 400, max_seconds: 0.3, check_every: 5, target_rel_precision: 0.03",
        "max_runs: 1000000, max_seconds: 3.0, check_every: 5, target_rel_precision: 0.0001"))
    from hardware_profiles import load_profile

    fingerprint = load_profile(PROFILE, [slow]).fingerprint()
    repo = Repository(db_url)
    queue = JobQueue(repo.engine)
    ids = []
    for index, artifact in enumerate((onnx_artifact, onnx_artifact_wide)):
        sha = file_sha256(artifact)
        repo.put_artifact(sha, artifact.read_bytes())
        ids.append(queue.submit(signature=f"sig{index}", profile=PROFILE, profile_fingerprint=fingerprint,
                                artifact_sha256=sha))
    hub = start_hub(db_url, lease_s=2.0)
    first = spawn_agent(hub.url, queue.add_agent("first", PROFILE), PROFILE, slow)
    agents = {a.name: a.id for a in queue.list_agents()}
    _wait(lambda: (queue.get(ids[0]).lease_agent_id == agents["first"]), 60, "the first agent's lease")  # type: ignore[union-attr]
    time.sleep(0.5)  # it is measuring now
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    spawn_agent(hub.url, queue.add_agent("second", PROFILE), PROFILE, slow)
    _wait(lambda: all(queue.get(i).status == DONE for i in ids), 90, "both jobs done")  # type: ignore[union-attr]
    killed_job = queue.get(ids[0])
    assert killed_job is not None and killed_job.attempts == 2
    second = {a.name: a.id for a in queue.list_agents()}["second"]
    assert killed_job.done_by_agent_id == second
    assert {a.name: a.jobs_done for a in queue.list_agents()} == {"first": 0, "second": 2}
    assert repo.count_measurements() == 2  # each job measured (accepted) exactly once


def test_hub_restart_mid_search(
    db_url: str, digits_bundle: Any, hwprune_cache: Path, standin_profiles: Path,
    start_hub: Callable[..., Any], spawn_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    hub, queue = _hub_with_two_agents(db_url, standin_profiles, start_hub, spawn_agent)
    env = {**os.environ, **_env(hwprune_cache, standin_profiles)}
    search = subprocess.Popen(
        [sys.executable, "-m", "search", "search", "start", "--name", "restart", "--example", "digits",
         "-p", PROFILE, "--trials", "6", "--recovery-steps", "3", "--db", db_url],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _completed(db_url, "restart") >= 2, 180, "two completed trials")
        hub.stop()
        time.sleep(1.5)
        hub.start()  # same port: the agents find it again after their backoff
        _, stderr = search.communicate(timeout=300)
        assert search.returncode == 0, stderr.decode()[-2000:]
    finally:
        if search.poll() is None:
            search.kill()
            search.communicate()
    assert _completed(db_url, "restart") == 6
    assert all(job.status == DONE for job in queue.jobs())


def test_agent_finishes_its_job_on_sigterm(
    tmp_path: Path, standin_profiles: Path, onnx_artifact: Path,
    start_hub: Callable[..., Any], spawn_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    slow = tmp_path / "slow-profiles"
    slow.mkdir()
    (slow / f"{PROFILE}.yaml").write_text((standin_profiles / f"{PROFILE}.yaml").read_text().replace(
        "max_runs: 400, max_seconds: 0.3, check_every: 5, target_rel_precision: 0.03",
        "max_runs: 1000000, max_seconds: 2.0, check_every: 5, target_rel_precision: 0.0001"))
    from hardware_profiles import load_profile

    repo = Repository(db_url)
    queue = JobQueue(repo.engine)
    sha = file_sha256(onnx_artifact)
    repo.put_artifact(sha, onnx_artifact.read_bytes())
    fingerprint = load_profile(PROFILE, [slow]).fingerprint()
    job_id = queue.submit(signature="s", profile=PROFILE, profile_fingerprint=fingerprint,
                          artifact_sha256=sha)
    hub = start_hub(db_url, lease_s=30.0)
    agent = spawn_agent(hub.url, queue.add_agent("a", PROFILE), PROFILE, slow)
    _wait(lambda: queue.get(job_id).status == "leased", 60, "the lease")  # type: ignore[union-attr]
    time.sleep(0.3)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=60) == 0
    job = queue.get(job_id)
    assert job is not None and job.status == DONE and job.attempts == 1
