"""Fault matrix: real SIGKILLs of a search, of agents mid-job and of the hub with leases held,
at seeded random moments; afterwards, every completed trial and every measurement is counted:
none may be lost, none duplicated.

* search: ``hwprune search start`` (a tiny plugin model, local ``cpu-ort-fp32``) is SIGKILLed
  after a random delay, then started again (which resumes it), ``--search-kills`` times; then it
  runs to its budget. Lost: a trial seen COMPLETE before a kill that is not COMPLETE, with the
  same values, afterwards. Duplicated: two COMPLETE trials retried from one killed trial, or
  more COMPLETE trials than the budget plus the retries' slack.
* agents: two ``hwprune agent`` processes serve paired jobs through a ``hwprune serve`` process;
  whenever an agent holds a lease it is SIGKILLed after a random delay and started again, until
  ``--agent-kills``; the hub is SIGKILLed ``--hub-kills`` times with a lease held (some of those
  land while a result is being posted) and started again on its port. Lost: a job not done at
  the end. Duplicated: a measurement accepted twice (agents' accepted counts summed against the
  number of jobs; cache rows against jobs).

Run by hand: ``.venv/bin/python bench/faults.py [--search-kills 20] [--agent-kills 20]
[--hub-kills 6] [--seed 14]``; it writes its section of docs/benchmarks.md. The test suite runs
the same functions with a few kills (tests/search_tests/test_fault_matrix.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY_PLUGIN = (ROOT / "tests" / "search_tests" / "tiny_plugin.py").read_text()

STANDIN_PROFILE = (ROOT / "tests" / "standin_profile.yaml").read_text()
PROFILE = "jetson-orin-ort-cpu"


@dataclass
class Counts:
    kills: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    notes: list[str] = field(default_factory=list)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _hwprune(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "search", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def _complete_trials(url: str, name: str) -> dict[int, tuple[Any, ...]]:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            study = optuna.load_study(study_name=f"hwprune:{name}", storage=url)
        except KeyError:
            return {}
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        study._storage.remove_session()  # type: ignore[attr-defined]
    return {t.number: (tuple(t.values), t.system_attrs.get("failed_trial")) for t in trials}


def search_faults(workdir: Path, *, kills: int, seed: int, trials: int = 40,
                  delay_s: tuple[float, float] = (2.0, 9.0), cache_dir: Path | None = None) -> Counts:
    """SIGKILL ``hwprune search start`` ``kills`` times at random moments, then finish it."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    module = f"faultplugin_{seed}"
    (workdir / f"{module}.py").write_text(TINY_PLUGIN)
    url = f"sqlite:///{workdir / 'search.db'}"
    env = _env(PYTHONPATH=f"{ROOT}{os.pathsep}{workdir}", HWPRUNE_HEARTBEAT_S="1", HWPRUNE_GRACE_S="2",
               HWPRUNE_CACHE=str(cache_dir or workdir / "cache"))
    budget = trials

    def command() -> tuple[str, ...]:
        return ("search", "start", "--name", "kill", "--model", f"{module}:bundle", "--trials", str(budget),
                "--recovery-steps", "2", "--db", url)

    counts = Counts()
    seen: dict[int, tuple[Any, ...]] = {}
    log = workdir / "search.log"
    step, starts = 2, 0
    while counts.kills < kills:
        starts += 1
        if starts > 4 * kills + 20:
            counts.notes.append(f"gave up after {starts - 1} starts: the search kept finishing before its kill")
            break
        process = _hwprune(*command(), env=env, log=log)
        deadline = time.monotonic() + rng.uniform(*delay_s)
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        if process.poll() is not None:
            if process.returncode != 0:
                counts.notes.append(f"search exited {process.returncode} before its kill; see {log}")
                break
            # Finished before the kill (a fast machine): give it twice as much more to do each time,
            # so that a later start outlives the kill delay and the kill lands mid-search.
            step *= 2
            budget += step
            continue
        _kill(process)
        counts.kills += 1
        now = _complete_trials(url, "kill")
        counts.lost += sum(1 for number, value in seen.items() if now.get(number) != value)
        seen = now
    final = subprocess.run([sys.executable, "-m", "search", *command()], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=900)
    if final.returncode != 0:
        counts.notes.append(f"final run exited {final.returncode}: {final.stderr.strip()[-300:]}")
    now = _complete_trials(url, "kill")
    counts.lost += sum(1 for number, value in seen.items() if now.get(number) != value)
    origins = [origin for _, origin in now.values() if origin is not None]
    counts.duplicated = len(origins) - len(set(origins)) + sum(1 for o in set(origins) if o in now)
    counts.completed = len(now)
    counts.notes.append(f"search budget {budget} trials")
    return counts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def agent_and_hub_faults(workdir: Path, *, agent_kills: int, hub_kills: int, seed: int,
                         jobs: int | None = None) -> Counts:
    """Kill agents mid-job and the hub with leases held; every job must end done, once."""
    import httpx

    from latency_models import file_sha256
    from search.storage import Repository
    from search.storage.queue import DONE, LEASED, JobQueue

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    profiles = workdir / "profiles"
    profiles.mkdir(exist_ok=True)
    (profiles / f"{PROFILE}.yaml").write_text(STANDIN_PROFILE)
    artifact = _tiny_onnx(workdir / "model.onnx")
    url = f"sqlite:///{workdir / 'hub.db'}"
    repo = Repository(url)
    queue = JobQueue(repo.engine)
    from hardware_profiles import load_profile

    profile = load_profile(PROFILE, [profiles])
    sha = file_sha256(artifact)
    repo.put_artifact(sha, artifact.read_bytes())
    ids: list[int] = []

    def submit(count: int) -> None:
        # Attempts are generous: each kill spends one, and a job failed by kills alone would be a
        # measurement the matrix cannot tell from a lost one.
        ids.extend(queue.submit(signature=f"fault{len(ids)}", profile=PROFILE,
                                profile_fingerprint=profile.fingerprint(), artifact_sha256=sha,
                                reference_sha256=sha, max_attempts=100) for _ in range(count))

    submit(jobs or 12)
    port = _free_port()
    server = f"http://127.0.0.1:{port}"
    env = _env(HWPRUNE_PROFILES=str(profiles), HWPRUNE_CACHE=str(workdir / "agent-cache"))
    log = workdir / "processes.log"

    def start_hub() -> subprocess.Popen[bytes]:
        return _serve(httpx, url, port, "2", env, log)

    tokens = {name: queue.add_agent(name, PROFILE) for name in ("orin-1", "orin-2")}
    agent_ids = {a.name: a.id for a in queue.list_agents()}

    def start_agent(name: str) -> subprocess.Popen[bytes]:
        return _hwprune("agent", "--server", server, "--profile", PROFILE, "--poll", "0.1", "--heartbeat", "0.3",
                        env={**env, "HWPRUNE_AGENT_TOKEN": tokens[name]}, log=log)

    hub = start_hub()
    agents = {name: start_agent(name) for name in tokens}
    counts = Counts()
    hub_killed = 0
    try:
        def leased_by(agent_id: int | None = None) -> bool:
            return any(j.status == LEASED and (agent_id is None or j.lease_agent_id == agent_id)
                       for j in queue.jobs())

        while counts.kills < agent_kills or hub_killed < hub_kills:
            if jobs is None and sum(1 for j in queue.jobs() if j.status != DONE) < 4:
                submit(8)  # keep the agents busy until the last kill
            elif all(j.status == DONE for j in queue.jobs()):
                counts.notes.append("ran out of jobs before the last kill")
                break
            kill_hub = hub_killed < hub_kills and (counts.kills >= agent_kills or rng.random() < 0.25)
            if kill_hub:
                if not _wait(lambda: leased_by(), 60):
                    continue
                time.sleep(rng.uniform(0.0, 0.6))  # somewhere in measuring or posting
                _kill(hub)
                hub_killed += 1
                time.sleep(rng.uniform(0.2, 1.5))  # agents retry with backoff meanwhile
                hub = start_hub()
                continue
            name = rng.choice(sorted(agents))
            if not _wait(functools.partial(leased_by, agent_ids[name]), 60):
                continue
            time.sleep(rng.uniform(0.0, 0.5))  # mid-download, mid-measurement or mid-post
            _kill(agents[name])
            counts.kills += 1
            agents[name] = start_agent(name)
        _wait(lambda: all(j.status == DONE for j in queue.jobs()), 300)
    finally:
        for process in (*agents.values(), hub):
            _kill(process)
    done = [queue.get(i) for i in ids]
    counts.completed = sum(1 for j in done if j is not None and j.status == DONE)
    counts.lost = len(ids) - counts.completed
    accepted = sum(a.jobs_done for a in queue.list_agents())
    counts.duplicated = max(0, accepted - counts.completed) + max(0, repo.count_measurements() - counts.completed)
    counts.notes.append(f"{hub_killed} hub kills with a lease held; {len(ids)} jobs")
    repo.close()
    return counts


def hub_killed_mid_post(workdir: Path, *, rounds: int, seed: int) -> Counts:
    """SIGKILL ``hwprune serve`` while a result body is half sent, restart it, post again: the
    half body is never accepted, the full one is accepted once, a repeat is a harmless duplicate."""
    import httpx

    from latency_models import Measurement
    from latency_models.remote import HubClient
    from latency_models.wire import MeasurementBody, ResultBody
    from search.storage import Repository
    from search.storage.queue import DONE, LEASED, JobQueue

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{workdir / 'hub.db'}"
    repo = Repository(url)
    queue = JobQueue(repo.engine)
    sha = "0" * 64
    ids = [queue.submit(signature=f"post{i}", profile=PROFILE, profile_fingerprint="f" * 16, artifact_sha256=sha)
           for i in range(rounds)]
    token = queue.add_agent("poster", PROFILE)
    port = _free_port()
    server = f"http://127.0.0.1:{port}"
    env = _env()
    log = workdir / "hub.log"

    def start_hub() -> subprocess.Popen[bytes]:
        return _serve(httpx, url, port, "120", env, log)

    counts = Counts()
    half_accepted = 0
    hub = start_hub()
    try:
        for _ in range(rounds):
            client = HubClient(server, token)
            job = client.lease(PROFILE)
            client.close()
            assert job is not None
            body = ResultBody(measurement=MeasurementBody.model_validate(Measurement(
                profile=PROFILE, backend="onnxruntime", backend_version="1", device="cpu", threads=1,
                median_us=100.0, p10_us=90.0, p90_us=110.0, mean_us=100.0, stdev_us=5.0, n=10, ci_low_us=98.0,
                ci_high_us=102.0, converged=True, elapsed_s=0.1, artifact_sha256=sha, settings_fingerprint="f")))
            raw = body.model_dump_json().encode()
            cut = rng.randrange(1, len(raw))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    f"POST /v1/jobs/{job.id}/result HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw[:cut])
                time.sleep(rng.uniform(0.05, 0.3))
                _kill(hub)
            counts.kills += 1
            stored = queue.get(job.id)
            half_accepted += int(stored is None or stored.status != LEASED)
            hub = start_hub()
            client = HubClient(server, token)
            first, again = client.post_result(job.id, body), client.post_result(job.id, body)
            client.close()
            if (first, again) != ("accepted", "duplicate"):
                counts.notes.append(f"job {job.id}: posts answered {first}, {again}")
    finally:
        _kill(hub)
    done = [queue.get(i) for i in ids]
    counts.completed = sum(1 for j in done if j is not None and j.status == DONE)
    counts.lost = rounds - counts.completed + half_accepted
    accepted = sum(a.jobs_done for a in queue.list_agents())
    counts.duplicated = max(0, accepted - counts.completed) + max(0, repo.count_measurements() - counts.completed)
    counts.notes.append(f"{half_accepted} half-sent bodies accepted")
    repo.close()
    return counts


def _serve(httpx: Any, url: str, port: int, lease_s: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``hwprune serve`` on ``port``, once it answers; started again if it exits early (a
    restart right after a SIGKILL can race the old socket on a loaded machine)."""
    for _ in range(5):
        hub = _hwprune("serve", "--db", url, "--port", str(port), "--lease-seconds", lease_s, env=env, log=log)
        if _wait(functools.partial(_up_or_gone, httpx, hub, port), 180) and hub.poll() is None:
            return hub
        _kill(hub)
        time.sleep(1)
    raise RuntimeError(f"hwprune serve did not start on port {port}; see {log}")


def _up_or_gone(httpx: Any, hub: subprocess.Popen[bytes], port: int) -> bool:
    return hub.poll() is not None or _up(httpx, f"http://127.0.0.1:{port}")


def _up(httpx: Any, server: str) -> bool:
    try:
        return bool(httpx.get(f"{server}/v1/health", timeout=1).status_code == 200)
    except httpx.HTTPError:
        return False


def _tiny_onnx(path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--search-kills", type=int, default=20)
    parser.add_argument("--agent-kills", type=int, default=20)
    parser.add_argument("--hub-kills", type=int, default=6)
    parser.add_argument("--mid-post-kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    from _report import write_section

    # Kept (not a TemporaryDirectory) so that the processes' logs can be read after a bad run.
    tmp = tempfile.mkdtemp(prefix="hwprune-faults-")
    print(f"logs under {tmp}", flush=True)
    started = time.perf_counter()
    remote = agent_and_hub_faults(Path(tmp) / "remote", agent_kills=args.agent_kills,
                                  hub_kills=args.hub_kills, seed=args.seed)
    remote_s = time.perf_counter() - started
    print(f"agents and hub: {remote} in {remote_s:.0f} s", flush=True)
    started = time.perf_counter()
    search = search_faults(Path(tmp) / "search", kills=args.search_kills, seed=args.seed)
    search_s = time.perf_counter() - started
    print(f"search: {search} in {search_s:.0f} s", flush=True)
    started = time.perf_counter()
    post = hub_killed_mid_post(Path(tmp) / "post", rounds=args.mid_post_kills, seed=args.seed)
    post_s = time.perf_counter() - started
    body = (
        "| fault | kills | completed | lost | duplicated | time |\n|---|---|---|---|---|---|\n"
        f"| `search start` SIGKILLed at random, then resumed | {search.kills} | {search.completed} trials | "
        f"{search.lost} | {search.duplicated} | {search_s:.0f} s |\n"
        f"| agents SIGKILLed holding a lease; hub SIGKILLed with a lease held | {remote.kills} agent + "
        f"{remote.notes[-1].split(' hub')[0]} hub | {remote.completed} measurements | {remote.lost} | "
        f"{remote.duplicated} | {remote_s:.0f} s |\n"
        f"| hub SIGKILLed while a result body is half sent, then the result posted twice | {post.kills} | "
        f"{post.completed} measurements | {post.lost} | {post.duplicated} | {post_s:.0f} s |\n\n"
        f"Seed {args.seed}. Notes: {'; '.join(search.notes + remote.notes + post.notes) or 'none'}.\n"
    )
    print(body)
    write_section("faults", "Fault matrix: SIGKILLs of searches, agents and the hub", " ".join(
        ["python bench/faults.py", *sys.argv[1:]]), body)


if __name__ == "__main__":
    main()
