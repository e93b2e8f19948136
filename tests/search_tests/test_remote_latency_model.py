"""``latency-model build`` on a remote profile: one batch job, measured by one agent in one lease.

The hub runs on real HTTP on 127.0.0.1; the agent is a real subprocess with torch and optuna made
unimportable, timing with ONNX Runtime on this machine's CPU (a loopback stand-in for a device,
named so in its profile). The agent that predates batch jobs is a real HTTP client speaking the
protocol as such an agent does (it never says it runs batches)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from latency_models.remote import HubClient
from search.cli.main import app
from search.storage import Repository
from search.storage.predictor_store import LatencyModelStore
from search.storage.queue import DONE, FAILED, JobQueue

REMOTE, LOCAL = "standin-remote", "standin-local"
# Short timing, so that a batch of a dozen layer shapes and a few plans takes seconds.
PROFILE = """\
description: Loopback stand-in for a remote device's CPU, served by an agent on this machine (tests).
backend: onnxruntime
device_class: cpu
location: {location}
threads: 1
warmup: {{runs: 2, min_seconds: 0}}
repeat: {{min_runs: 10, max_runs: 100, max_seconds: 0.1, check_every: 5, target_rel_precision: 0.05}}
channel_multiple: 16
timeout_s: 60
"""
# Only the first residual block is pruned: a handful of layer shapes to time.
IGNORED = ["stages.1.3.conv1", "stages.1.3.conv2", "stages.2.3.conv1", "stages.2.3.conv2"]
runner = CliRunner()


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / f"{REMOTE}.yaml").write_text(PROFILE.format(location="remote"))
    (folder / f"{LOCAL}.yaml").write_text(PROFILE.format(location="local"))
    return folder


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _build(url: str, profiles: Path, cache: Path, profile: str, *extra: str) -> Any:
    args = ["--profiles-dir", str(profiles), "latency-model", "build", "--example", "digits", "-p", profile,
            "--db", url, *(a for name in IGNORED for a in ("--ignore", name)), *extra]
    return runner.invoke(app, args, env={"HWPRUNE_CACHE": str(cache)})


def _tables(url: str) -> dict[str, dict[str, float]]:
    repo = Repository(url)
    try:
        store = LatencyModelStore(repo.engine)
        return {name: store.get(name).model().to_state()["params"]["table"] for name in store.names()}
    finally:
        repo.close()


def test_remote_build_is_one_batch_job_in_one_lease(
    db_url: str, digits_bundle: Any, hwprune_cache: Path, profiles: Path,
    start_hub: Callable[..., Any], spawn_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    hub = start_hub(db_url)
    queue = JobQueue(Repository(db_url).engine)
    spawn_agent(hub.url, queue.add_agent("device-1", REMOTE), REMOTE, profiles)
    _wait(lambda: bool(queue.live_agents(REMOTE, 60)), 60, "a live agent")

    remote = _build(db_url, profiles, hwprune_cache, REMOTE, "--samples", "6", "--name", "remote", "--json")
    assert remote.exit_code == 0, remote.output
    report = json.loads(remote.stdout)
    assert report["location"] == "remote" and report["samples"] == 6
    held = report["held_out"]
    assert held is not None and held["n"] == 6 and held["worst"] >= held["mape"] >= 0

    # One job, leased once, done by the one agent, which counts one job.
    jobs = queue.jobs()
    assert [(j.kind, j.status, j.attempts) for j in jobs] == [("batch", DONE, 1)]
    (agent,) = queue.list_agents()
    assert jobs[0].done_by_agent_id == agent.id and agent.jobs_done == 1
    assert jobs[0].progress == report["layers_timed"] + 6
    result = jobs[0].batch_result
    assert result is not None and result.profile == REMOTE and result.device

    local = _build(db_url, profiles, hwprune_cache, LOCAL, "--samples", "6", "--name", "local", "--json")
    assert local.exit_code == 0, local.output
    tables = _tables(db_url)
    assert set(tables["remote"]) == set(tables["local"]) and len(tables["remote"]) == report["layers_timed"]
    assert all(value > 0 for value in tables["remote"].values())
    assert len(queue.jobs()) == 1  # the local build queued nothing


@pytest.fixture
def hub_client(db_url: str, start_hub: Callable[..., Any]) -> Iterator[Callable[[str, dict[str, str]], HubClient]]:
    """An agent registered for the remote profile, as a bare HTTP client reporting ``environment``."""
    hub = start_hub(db_url)
    clients: list[HubClient] = []

    def connect(name: str, environment: dict[str, str]) -> HubClient:
        queue = JobQueue(Repository(db_url).engine)
        client = HubClient(hub.url, queue.add_agent(name, REMOTE))
        client.heartbeat(environment=environment)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def test_an_agent_that_predates_batches_fails_the_job_with_one_line(
    db_url: str, digits_bundle: Any, hwprune_cache: Path, profiles: Path,
    hub_client: Callable[[str, dict[str, str]], HubClient],
) -> None:
    old = hub_client("old-device", {"agent_profile": REMOTE, "backend": "onnxruntime"})
    stop = threading.Event()
    leased: list[Any] = []

    def poll() -> None:  # the old agent's loop: lease, and idle while nothing is given
        while not stop.wait(0.1):
            job = old.lease(REMOTE)
            if job is not None:
                leased.append(job)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        result = _build(db_url, profiles, hwprune_cache, REMOTE, "--samples", "2")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert result.exit_code == 1, result.output
    assert result.output.count("error:") == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "runs 'batch' jobs" in result.stderr and "update hwprune on the device" in result.stderr
    assert leased == []  # the batch never reached the agent that cannot run it
    queue = JobQueue(Repository(db_url).engine)
    assert [(j.kind, j.status, j.attempts) for j in queue.jobs()] == [("batch", FAILED, 0)]
    assert _tables(db_url) == {}

    # A measure job still reaches it, in the lease body such an agent knows (no new fields).
    repo = Repository(db_url)
    from hardware_profiles import load_profile

    sha = queue.jobs()[0].artifact_sha256
    queue.submit(signature="s", profile=REMOTE, profile_fingerprint=load_profile(REMOTE, [profiles]).fingerprint(),
                 artifact_sha256=sha)
    raw = httpx.post(f"{old.server}/v1/jobs/lease", json={"profile": REMOTE},
                     headers=old._client.headers)  # the wire as an old agent reads it
    assert raw.status_code == 200 and not {"kind", "batch"} & set(raw.json())
    repo.close()


def test_timeout_is_one_line_and_stores_nothing(
    db_url: str, digits_bundle: Any, hwprune_cache: Path, profiles: Path,
    hub_client: Callable[[str, dict[str, str]], HubClient],
) -> None:
    # Live and able to run batches, but it never leases: a device that hangs.
    hub_client("stuck-device", {"agent_profile": REMOTE, "job_kinds": "measure,batch"})
    result = _build(db_url, profiles, hwprune_cache, REMOTE, "--samples", "2", "--timeout", "1")
    assert result.exit_code == 1, result.output
    assert result.output.count("error:") == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "within 1 s (status queued, 0 of" in result.stderr and "nothing stored" in result.stderr
    queue = JobQueue(Repository(db_url).engine)
    (job,) = queue.jobs()
    assert job.status == FAILED and job.attempts == 0  # cancelled: no agent measures it for nobody
    assert _tables(db_url) == {}
