"""The hub against hostile bytes, over real HTTP (uvicorn on 127.0.0.1): bodies capped before
authentication, results checked before they reach the cache, bounded ids and agent strings,
reader tokens for the read endpoints."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send
from typer.testing import CliRunner

from latency_models import Measurement, MeasurementKey, MeasurementResult, file_sha256
from search.cli.main import app
from search.hub.body_cap import DRAIN_BYTES, BodyCap
from search.storage import Repository
from search.storage.queue import FAILED, QUEUED, JobQueue

PROFILE = "jetson-orin-ort-cpu"
BASE_SHA = "b" * 64


@pytest.fixture
def hub(tmp_path: Path, start_hub: Callable[..., Any], onnx_artifact: Path) -> Iterator[dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    repo = Repository(url)
    queue = JobQueue(repo.engine)
    tokens = {"a": queue.add_agent("a", PROFILE), "reader": queue.add_agent("dash", "", role="reader")}
    sha = file_sha256(onnx_artifact)
    repo.put_artifact(sha, onnx_artifact.read_bytes())
    # The base model alone on this profile, cached: paired ratios are checked against it.
    repo.put_measurement(MeasurementKey("base", "f" * 16), MeasurementResult(_measurement(BASE_SHA, median_us=200.0)))
    job = queue.submit(signature="s1", profile=PROFILE, profile_fingerprint="f" * 16, artifact_sha256=sha,
                       reference_sha256=BASE_SHA)
    server = start_hub(url)
    yield {"url": server.url + "/v1", "tokens": tokens, "sha": sha, "job": job, "repo": repo, "queue": queue,
           "db": url}
    repo.close()


def _client(hub: dict[str, Any], who: str | None = "a") -> httpx.Client:
    headers = {"Authorization": f"Bearer {hub['tokens'][who]}"} if who else {}
    return httpx.Client(base_url=hub["url"], headers=headers, timeout=30)


def _measurement(sha: str, **changes: Any) -> Measurement:
    m = Measurement(
        profile=PROFILE, backend="onnxruntime", backend_version="1.20", device="cpu", threads=1, median_us=100.0,
        p10_us=90.0, p90_us=110.0, mean_us=100.0, stdev_us=5.0, n=10, ci_low_us=98.0, ci_high_us=102.0,
        converged=True, elapsed_s=0.1, artifact_sha256=sha, settings_fingerprint="f" * 16,
    )
    return dataclasses.replace(m, **changes)


def _body(sha: str, *, ratio: float = 0.5, ratio_ci: tuple[float, float] = (0.49, 0.51), **changes: Any) -> str:
    # Built by hand: json.dumps writes Infinity/NaN, as a hostile or buggy agent would.
    return json.dumps({"measurement": dataclasses.asdict(_measurement(sha, **changes)), "ratio": ratio,
                       "ratio_ci": list(ratio_ci)})


def _post(client: httpx.Client, path: str, raw: str | bytes) -> httpx.Response:
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def _too_large(request: Callable[[], httpx.Response]) -> bool:
    """The hub answered 413, or closed the connection while the body was still coming: a body
    more than DRAIN_BYTES over the cap is refused without reading it all, and the reset of the
    unread bytes can overtake the 413 on the wire (more often on a loaded machine)."""
    try:
        response = request()
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
        return True
    return _is_413(response)


def _is_413(response: httpx.Response) -> bool:
    return response.status_code == 413 and response.json()["error"] == "PayloadTooLarge"


def test_bodies_are_capped_before_authentication(hub: dict[str, Any]) -> None:
    big = b"x" * (1 << 20)  # within DRAIN_BYTES of the cap: read to its end, so the 413 arrives whole
    with _client(hub, None) as anonymous:
        for path in ("/jobs/lease", "/agents/heartbeat", f"/jobs/{hub['job']}/result"):
            assert _is_413(anonymous.post(path, content=big)), path
            # No Content-Length: the cap counts the chunks as they arrive.
            assert _is_413(anonymous.post(path, content=iter([big[:40_000], big[:40_000]]))), path
        assert anonymous.post("/jobs/lease", json={"profile": PROFILE}).status_code == 401


def _through_body_cap(parts: list[bytes], *, declared: bool, limit: int = 4096,
                      stall_after: int | None = None) -> tuple[int, list[str]]:
    """Drives BodyCap as a server would, a client sending ``parts``; returns the parts it read
    and the order of events ("read" per part, then "start" and "body" of the response).
    ``stall_after``: the client sends that many parts and then nothing."""
    events: list[str] = []
    read = 0

    async def receive() -> Message:
        nonlocal read
        if stall_after is not None and read == stall_after:
            await anyio.sleep_forever()
        read += 1
        events.append("read")
        return {"type": "http.request", "body": parts[read - 1], "more_body": read < len(parts)}

    async def send(message: Message) -> None:
        events.append(message["type"].rsplit(".", 1)[1])
        if message["type"] == "http.response.start":
            assert message["status"] == 413

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("a body over the cap reached the app")

    headers = [(b"content-length", str(sum(map(len, parts))).encode())] if declared else []
    scope: Scope = {"type": "http", "path": "/v1/jobs/1/result", "headers": headers}
    anyio.run(BodyCap(app, limit=limit), scope, receive, send)
    return read, events


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_just_over_the_cap_is_read_to_its_end_before_the_413(declared: bool) -> None:
    # Closing with unread bytes makes the kernel send a reset that can overtake the 413 (a CI
    # failure: "connection reset by peer" where test_hub expected 413).
    parts = [b"x" * 3000] * 5
    read, events = _through_body_cap(parts, declared=declared)
    assert read == len(parts) and events == ["read"] * 5 + ["start", "body"]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_reading_a_refused_body_is_bounded_in_bytes(declared: bool) -> None:
    parts = [b"x" * (256 << 10)] * 12  # 3 MiB, past the cap by more than DRAIN_BYTES
    read, events = _through_body_cap(parts, declared=declared)
    assert events[-2:] == ["start", "body"]
    # Declared that large: not read at all. Streamed: read until past the cap by DRAIN_BYTES,
    # which is the fifth part (1.25 MiB).
    assert DRAIN_BYTES == 1 << 20
    assert read == (0 if declared else 5)


def test_reading_a_refused_body_is_bounded_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("search.hub.body_cap.DRAIN_SECONDS", 0.05)
    read, events = _through_body_cap([b"x" * 3000] * 5, declared=True, stall_after=2)
    assert read == 2 and events == ["read", "read", "start", "body"]


def test_heartbeat_environment_is_bounded_and_cleaned(hub: dict[str, Any]) -> None:
    with _client(hub) as agent:
        assert _too_large(lambda: agent.post("/agents/heartbeat", json={"environment": {"device": "x" * (8 << 20)}}))
        many = {f"k{i}": "v" for i in range(33)}
        assert agent.post("/agents/heartbeat", json={"environment": many}).status_code == 422
        assert agent.post("/agents/heartbeat", json={"environment": {"device": "y" * 501}}).status_code == 422
        hostile = {"device": "\x1b[2J\x1b]0;pwned\x07Orin\u202e\r\nfake row"}
        assert agent.post("/agents/heartbeat", json={"environment": hostile}).status_code == 200
    stored = {a.name: a for a in hub["queue"].list_agents()}["a"].environment
    assert stored == {"device": "[2J]0;pwnedOrinfake row"}
    listing = CliRunner().invoke(app, ["agents", "list", "--db", hub["db"]])
    assert listing.exit_code == 0 and "\x1b" not in listing.stdout and "Orin" in listing.stdout


@pytest.mark.parametrize("changes, expected", [
    ({"ratio": math.inf}, "finite"),
    ({"ratio_ci": (math.nan, -5.0)}, "ratio_ci"),
    ({"p10_us": -1.0}, "greater than or equal to 0"),
    ({"median_us": 1e999}, "finite"),
    ({"n": True}, "integer"),
    ({"backend_version": "9" * 51}, "at most 50 characters"),
])
def test_results_outside_the_schema_are_refused_and_never_cached(hub: dict[str, Any], changes: dict[str, Any],
                                                                 expected: str) -> None:
    with _client(hub) as agent:
        job = agent.post("/jobs/lease", json={"profile": PROFILE}).json()
        refused = _post(agent, f"/jobs/{job['id']}/result", _body(hub["sha"], **changes))
        assert refused.status_code == 422, refused.text
        assert expected in refused.json()["detail"] and "\n" not in refused.json()["detail"]
        assert _post(agent, f"/jobs/{job['id']}/result", _body(hub["sha"])).json() == {"status": "accepted"}
    assert hub["repo"].find_measurement(MeasurementKey("s1", "f" * 16, BASE_SHA)) is not None  # only the valid one
    stored = hub["queue"].get(job["id"])
    assert stored.result.ratio == 0.5 and stored.result.measurement.median_us == 100.0


@pytest.mark.parametrize("changes, expected", [
    ({"artifact_sha256": "c" * 64}, "the job's is"),
    ({"profile": "cpu-ort-fp32"}, "the job's is"),
])
def test_a_result_for_another_job_is_a_conflict_that_fails_the_job(hub: dict[str, Any], changes: dict[str, Any],
                                                                    expected: str) -> None:
    # Schema-valid, so not 422 (issue 34: the OpenAPI document is what the hub accepts).
    with _client(hub) as agent:
        job = agent.post("/jobs/lease", json={"profile": PROFILE}).json()
        sha = changes.pop("artifact_sha256", hub["sha"])
        refused = _post(agent, f"/jobs/{job['id']}/result", _body(sha, **changes))
        assert refused.status_code == 409, refused.text
        assert expected in refused.json()["detail"] and "\n" not in refused.json()["detail"]
    assert hub["repo"].find_measurement(MeasurementKey("s1", "f" * 16, BASE_SHA)) is None
    stored = hub["queue"].get(job["id"])
    assert stored.result is None and "result refused by the hub" in (stored.last_error or "")


@pytest.mark.parametrize("changes, expected", [
    ({"ci_low_us": 120.0, "ci_high_us": 80.0}, "does not hold the median"),
    ({"p10_us": 150.0}, "percentiles out of order"),
    ({"ratio": 0.9}, "outside its interval"),
    ({"device": "\x1b[31mred"}, "printable"),
])
def test_inconsistent_results_are_flagged_and_never_cached(hub: dict[str, Any], changes: dict[str, Any],
                                                           expected: str) -> None:
    # What JSON Schema cannot say is checked after parsing: kept for inspection, measured again.
    with _client(hub) as agent:
        job = agent.post("/jobs/lease", json={"profile": PROFILE}).json()
        assert _post(agent, f"/jobs/{job['id']}/result", _body(hub["sha"], **changes)).json() == {"status": "flagged"}
    assert hub["repo"].find_measurement(MeasurementKey("s1", "f" * 16, BASE_SHA)) is None
    stored = hub["queue"].get(job["id"])
    assert stored.status == QUEUED and stored.result is None and expected in stored.flagged["reason"]


@pytest.mark.parametrize("ratio, median_us, why", [
    (40.0, 8000.0, "outside"),   # 40 times slower than its base
    (0.5, 5000.0, "disagrees"),  # half the base's 200 us, yet a median of 5 ms
])
def test_implausible_results_are_flagged_not_trusted(hub: dict[str, Any], ratio: float, median_us: float,
                                                     why: str) -> None:
    with _client(hub) as agent:
        job = agent.post("/jobs/lease", json={"profile": PROFILE}).json()
        body = _body(hub["sha"], ratio=ratio, ratio_ci=(ratio * 0.9, ratio * 1.1), median_us=median_us,
                     p10_us=median_us * 0.9, p90_us=median_us * 1.1, mean_us=median_us,
                     ci_low_us=median_us * 0.95, ci_high_us=median_us * 1.05)
        assert _post(agent, f"/jobs/{job['id']}/result", body).json() == {"status": "flagged"}
    assert hub["repo"].find_measurement(MeasurementKey("s1", "f" * 16, BASE_SHA)) is None
    stored = hub["queue"].get(job["id"])
    assert stored.status == QUEUED and stored.result is None  # measured again, by whoever leases it
    assert why in stored.flagged["reason"] and stored.flagged["result"]["ratio"] == ratio
    assert "implausible result from agent a" in (stored.last_error or "")


def test_flagged_on_every_attempt_fails_the_job(hub: dict[str, Any]) -> None:
    body = _body(hub["sha"], ratio=0.001, ratio_ci=(0.001, 0.001))
    with _client(hub) as agent:
        for _ in range(3):
            job = agent.post("/jobs/lease", json={"profile": PROFILE}).json()
            assert _post(agent, f"/jobs/{job['id']}/result", body).json() == {"status": "flagged"}
    assert hub["queue"].get(hub["job"]).status == FAILED


@pytest.mark.parametrize("path", ["/jobs/{id}/result", "/jobs/{id}/failure", "/jobs/{id}/release"])
def test_huge_job_ids_are_refused_not_500(hub: dict[str, Any], path: str) -> None:
    with _client(hub) as agent:
        for job_id in (2**31, 2**63, 2**64 + 7, 10**40, -1, 0):
            response = agent.post(path.format(id=job_id), json={"error": "x"})
            assert response.status_code == 422, (job_id, response.text)
        assert agent.post(path.format(id=2**31 - 1), json={"error": "x"}).status_code in (404, 422)
        assert agent.post("/agents/heartbeat", json={"job_id": 2**63}).status_code == 422


def test_job_ids_at_the_limit_on_every_database(db_url: str, start_hub: Callable[..., Any]) -> None:
    repo = Repository(db_url)
    token = JobQueue(repo.engine).add_agent("a", PROFILE)
    server = start_hub(db_url)
    with httpx.Client(base_url=server.url + "/v1", headers={"Authorization": f"Bearer {token}"}) as agent:
        for job_id in (1, 2**31 - 1):  # up to the end of PostgreSQL's INTEGER
            assert agent.post(f"/jobs/{job_id}/release").status_code == 404
            assert agent.post("/agents/heartbeat", json={"job_id": job_id}).json() == {"lease_held": False}
        for job_id in (2**31, 2**63):
            assert agent.post(f"/jobs/{job_id}/release").status_code == 422
    repo.close()


def test_read_endpoints_need_a_reader_token(hub: dict[str, Any]) -> None:
    paths = ["/searches", "/searches/x", "/searches/x/trials", "/searches/x/pareto"]
    with _client(hub, None) as anonymous, _client(hub, "a") as agent, _client(hub, "reader") as reader:
        for path in paths:
            assert anonymous.get(path).status_code == 401
            assert agent.get(path).status_code == 403
        assert reader.get("/searches").json() == []
        assert reader.get("/searches/x").status_code == 404
        assert reader.get("/searches/" + "x" * 101).status_code == 422
        assert reader.post("/jobs/lease", json={"profile": PROFILE}).status_code == 403
        assert reader.post("/agents/heartbeat", json={}).status_code == 403
        assert anonymous.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("name", ["\x1b[31mred", "a\nb", "x" * 5000, "../../etc/passwd", "", "a b"])
def test_agent_names_are_slugs(tmp_path: Path, name: str) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    result = CliRunner().invoke(app, ["agents", "add", name, "--profile", "cpu-ort-fp32", "--db", url])
    assert result.exit_code == 2
    assert "agent name" in result.stderr and "\x1b" not in result.stderr and len(result.stderr) < 400
    assert not (tmp_path / "a.db").exists()  # refused before the database is created


def test_reader_token_from_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    runner = CliRunner()
    added = runner.invoke(app, ["agents", "add", "dashboard", "--reader", "--db", url])
    assert added.exit_code == 0 and len(added.stdout.strip()) > 30
    both = runner.invoke(app, ["agents", "add", "x", "--reader", "--profile", "cpu-ort-fp32", "--db", url])
    assert both.exit_code == 2 and "--reader" in both.stderr
    listed = json.loads(runner.invoke(app, ["agents", "list", "--db", url, "--json"]).stdout)
    assert [(a["name"], a["role"]) for a in listed] == [("dashboard", "reader")]
