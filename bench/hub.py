"""Hub throughput: 20 concurrent agent clients leasing jobs and posting results over HTTP.

The measurement itself is replaced by an immediate, fixed result (no model is run): this times
the hub and its queue, not a backend. The hub runs as its own ``hwprune serve`` process on
127.0.0.1; each client is a thread with its own token and HTTP connection, looping
lease -> post result until the queue is empty. Reported: round trips (lease + result) per
second, and lost (never done) and duplicated (accepted twice) results, checked against the
database afterwards; and the CPU time the hub process and the client threads spent per round
trip, which on a shared machine says more than the rate (the rate also depends on what else runs).

Run by hand: ``.venv/bin/python bench/hub.py [--jobs 2000] [--clients 20] [--db URL]``. The hub
runs the code on ``PYTHONPATH`` (``--label`` names it: another tree's code can be timed with this
script, its section written beside this tree's).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from _report import write_section  # noqa: E402

from latency_models import Measurement  # noqa: E402
from latency_models.remote import HubClient  # noqa: E402
from latency_models.wire import MeasurementBody, ResultBody  # noqa: E402
from search.storage import Repository  # noqa: E402
from search.storage.queue import DONE, JobQueue  # noqa: E402

PROFILE = "jetson-orin-ort-cpu"
SHA = "0" * 64


def fixed_result() -> ResultBody:
    return ResultBody(measurement=MeasurementBody.model_validate(Measurement(
        profile=PROFILE, backend="none (benchmark stand-in)", backend_version="-", device="-", threads=None,
        median_us=100.0, p10_us=100.0, p90_us=100.0, mean_us=100.0, stdev_us=0.0, n=1, ci_low_us=100.0,
        ci_high_us=100.0, converged=True, elapsed_s=0.0, artifact_sha256=SHA, settings_fingerprint="-")))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--db", default=None, help="default: a new SQLite file")
    parser.add_argument("--hub-workers", type=int, default=1)
    parser.add_argument("--label", default="", help="names the code under test in the section written")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{tmp}/hub.db"
        repo = Repository(url)
        queue = JobQueue(repo.engine)
        tokens = [queue.add_agent(f"bench-{i}", PROFILE) for i in range(args.clients)]
        for index in range(args.jobs):
            queue.submit(signature=f"sig{index}", profile=PROFILE, profile_fingerprint="f" * 16, artifact_sha256=SHA)
        port = free_port()
        hub = subprocess.Popen([sys.executable, "-m", "search", "serve", "--db", url, "--port", str(port),
                                "--workers", str(args.hub_workers)],
                               env=os.environ.copy())
        server = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{server}/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the hub did not start")
            time.sleep(0.2)
        accepted: collections.Counter[int] = collections.Counter()
        lock = threading.Lock()
        trips = [0] * args.clients
        body = fixed_result()

        def client(index: int) -> None:
            hub_client = HubClient(server, tokens[index])
            try:
                while (job := hub_client.lease(PROFILE)) is not None:
                    outcome = hub_client.post_result(job.id, body)
                    trips[index] += 1
                    if outcome == "accepted":
                        with lock:
                            accepted[job.id] += 1
            finally:
                hub_client.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        load = os.getloadavg()[0]
        hub_cpu, client_cpu = cpu_seconds(hub.pid), time.process_time()
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
        # With several hub workers the CPU is in uvicorn's children: counted only for one.
        hub_cpu = cpu_seconds(hub.pid) - hub_cpu if args.hub_workers == 1 else math.nan
        hub.terminate()
        hub.wait(timeout=30)
        jobs = queue.jobs()
        lost = sum(job.status != DONE for job in jobs)
        duplicated = sum(count > 1 for count in accepted.values())
        cached = repo.count_measurements()
        repo.close()
    backend = "PostgreSQL" if url.startswith("postgresql") else "SQLite"
    rate = sum(trips) / elapsed
    per_trip_ms = 1000 / max(1, sum(trips))
    line = (f"| {backend} | {args.hub_workers} | {args.clients} | {args.jobs} | {sum(trips)} | "
            f"{elapsed:.2f} | {rate:.0f} | {lost} | {duplicated} | {cached} | {hub_cpu * per_trip_ms:.2f} | "
            f"{client_cpu * per_trip_ms:.2f} | {load:.1f} |")
    print(line)
    body_md = (
        "The measurement is replaced by an immediate fixed result (no model runs): this times the hub "
        "(`hwprune serve`, uvicorn, on the same 2 cores as the clients) and its queue only. Each client "
        "is a thread with its own token looping lease -> post result; a round trip is one lease plus one "
        "result. CPU columns: milliseconds of CPU per round trip in the hub process and in the client "
        "threads; load: the machine's 1-minute load average when the clients started.\n\n"
        "| database | hub workers | clients | jobs | round trips | seconds | round trips/s | lost | duplicated "
        "| cache rows | hub CPU ms/trip | client CPU ms/trip | load |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + line
        + "\n\nAim: >= 200 round trips/s, 0 lost, 0 duplicated.\n"
    )
    suffix = f"-{args.label}" if args.label else ""
    write_section(f"hub-{backend.lower()}-w{args.hub_workers}{suffix}",
                  f"Hub throughput on {backend}, {args.hub_workers} hub worker(s)"
                  + (f", {args.label}" if args.label else "") + " (bench/hub.py)",
                  f".venv/bin/python bench/hub.py --jobs {args.jobs} --clients {args.clients} "
                  f"--hub-workers {args.hub_workers}" + (f" --label {args.label}" if args.label else "")
                  + (" --db postgresql+psycopg://..." if args.db else ""), body_md)


if __name__ == "__main__":
    main()
