"""The hub over real HTTP (uvicorn on 127.0.0.1): every refusal, and the happy path of a job."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from latency_models import Measurement, MeasurementKey, file_sha256
from latency_models.wire import MeasurementBody, ResultBody
from search.storage import Repository
from search.storage.artifacts import ArtifactStore
from search.storage.queue import JobQueue

PROFILE = "jetson-orin-ort-cpu"


@pytest.fixture
def hub(tmp_path: Path, start_hub: Callable[..., Any], onnx_artifact: Path) -> dict[str, Any]:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    repo = Repository(url)
    queue = JobQueue(repo.engine)
    tokens = {"a": queue.add_agent("a", PROFILE), "b": queue.add_agent("b", PROFILE),
              "cpu": queue.add_agent("cpu", "cpu-ort-fp32"), "reader": queue.add_agent("dash", "", role="reader")}
    sha = file_sha256(onnx_artifact)
    repo.put_artifact(sha, onnx_artifact.read_bytes())
    other = b"not leased by anybody"
    repo.put_artifact(hashlib.sha256(other).hexdigest(), other)
    job_id = queue.submit(signature="s1", profile=PROFILE, profile_fingerprint="f" * 16, artifact_sha256=sha)
    server = start_hub(url, max_result_bytes=4096)
    return {"url": server.url + "/v1", "tokens": tokens, "sha": sha, "job": job_id, "repo": repo, "queue": queue,
            "other": hashlib.sha256(other).hexdigest()}


def _client(hub: dict[str, Any], who: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {hub['tokens'][who]}"} if who else {}
    return httpx.Client(base_url=hub["url"], headers=headers, timeout=10)


def _result(sha: str) -> dict[str, Any]:
    measurement = Measurement(
        profile=PROFILE, backend="onnxruntime", backend_version="x", device="d", threads=1, median_us=100.0,
        p10_us=90.0, p90_us=110.0, mean_us=100.0, stdev_us=5.0, n=10, ci_low_us=98.0, ci_high_us=102.0,
        converged=True, elapsed_s=0.1, artifact_sha256=sha, settings_fingerprint="f" * 16,
    )
    return ResultBody(measurement=MeasurementBody.model_validate(measurement)).model_dump(mode="json")


def test_every_agent_endpoint_needs_a_token(hub: dict[str, Any]) -> None:
    with _client(hub, None) as anonymous:
        for method, path in [("POST", "/agents/heartbeat"), ("POST", "/jobs/lease"),
                             ("GET", f"/artifacts/{hub['sha']}"), ("POST", f"/jobs/{hub['job']}/result"),
                             ("POST", f"/jobs/{hub['job']}/failure"), ("POST", f"/jobs/{hub['job']}/release")]:
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401, (method, path)
            assert response.json() == {"error": "HTTPException", "detail": "missing bearer token"}
    with httpx.Client(base_url=hub["url"], headers={"Authorization": "Bearer forged"}) as forged:
        response = forged.post("/jobs/lease", json={"profile": PROFILE})
        assert response.status_code == 401 and "unknown or revoked token" in response.text


def test_revoked_token_is_refused(hub: dict[str, Any]) -> None:
    hub["queue"].revoke_agent("b")
    with _client(hub, "b") as client:
        assert client.post("/jobs/lease", json={"profile": PROFILE}).status_code == 401


def test_token_leases_only_its_own_profile(hub: dict[str, Any]) -> None:
    with _client(hub, "cpu") as client:
        response = client.post("/jobs/lease", json={"profile": PROFILE})
        assert response.status_code == 403
        assert "serves profile 'cpu-ort-fp32'" in response.json()["detail"]


def test_artifacts_only_for_leased_jobs(hub: dict[str, Any]) -> None:
    with _client(hub, "a") as a, _client(hub, "b") as b:
        assert a.get(f"/artifacts/{hub['sha']}").status_code == 403  # nothing leased yet
        job = a.post("/jobs/lease", json={"profile": PROFILE}).json()
        assert job["id"] == hub["job"] and job["attempt"] == 1
        downloaded = a.get(f"/artifacts/{hub['sha']}")
        assert downloaded.status_code == 200 and downloaded.content.startswith(b"\x08")
        assert b.get(f"/artifacts/{hub['sha']}").status_code == 403  # b holds no such lease
        assert a.get(f"/artifacts/{hub['other']}").status_code == 403


def test_artifacts_are_served_from_the_store_beside_the_database(hub: dict[str, Any], tmp_path: Path) -> None:
    """The bytes live in the artifact store (hub.artifacts/ beside hub.db), not in the database;
    a file that no longer matches its sha256 is never served."""
    store: ArtifactStore = hub["repo"].artifacts
    assert Path(store.url) == tmp_path / "hub.artifacts" and hub["sha"] in store.names()
    with _client(hub, "a") as a:
        a.post("/jobs/lease", json={"profile": PROFILE})
        path = store.local_path(hub["sha"])
        assert path is not None
        good = path.read_bytes()
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
        assert a.get(f"/artifacts/{hub['sha']}").status_code == 404
        hub["repo"].put_artifact(hub["sha"], good)  # re-materialised
        assert a.get(f"/artifacts/{hub['sha']}").content == good


def test_results_only_from_the_holder_once_and_bounded(hub: dict[str, Any]) -> None:
    with _client(hub, "a") as a, _client(hub, "b") as b:
        job = a.post("/jobs/lease", json={"profile": PROFILE}).json()
        body = _result(hub["sha"])
        assert b.post(f"/jobs/{job['id']}/result", json=body).status_code == 409
        too_big = a.post(f"/jobs/{job['id']}/result", content=b"{" + b" " * 5000 + b"}",
                         headers={"Content-Type": "application/json"})
        assert too_big.status_code == 413
        invalid = a.post(f"/jobs/{job['id']}/result", json={"measurement": {"median_us": -1}})
        assert invalid.status_code == 422
        accepted = a.post(f"/jobs/{job['id']}/result", json=body)
        assert accepted.status_code == 200 and accepted.json() == {"status": "accepted"}
        again = a.post(f"/jobs/{job['id']}/result", json=body)
        assert again.status_code == 200 and again.json() == {"status": "duplicate"}
        assert a.post("/jobs/424242/result", json=body).status_code == 404
    cached = hub["repo"].find_measurement(MeasurementKey("s1", "f" * 16))
    assert cached is not None and cached.measurement.median_us == 100.0  # it landed in the cache


def test_failure_and_release_only_from_the_holder(hub: dict[str, Any]) -> None:
    with _client(hub, "a") as a, _client(hub, "b") as b:
        job = a.post("/jobs/lease", json={"profile": PROFILE}).json()
        assert b.post(f"/jobs/{job['id']}/failure", json={"error": "x"}).status_code == 409
        assert b.post(f"/jobs/{job['id']}/release").status_code == 409
        assert a.post(f"/jobs/{job['id']}/release").json() == {"status": "accepted"}
        assert b.post("/jobs/lease", json={"profile": PROFILE}).json()["id"] == job["id"]


def test_heartbeat_reports_lease_and_openapi_is_served(hub: dict[str, Any]) -> None:
    with _client(hub, "a") as a:
        job = a.post("/jobs/lease", json={"profile": PROFILE}).json()
        assert a.post("/agents/heartbeat", json={"job_id": job["id"]}).json() == {"lease_held": True}
        with _client(hub, "b") as b:
            assert b.post("/agents/heartbeat", json={"job_id": job["id"]}).json() == {"lease_held": False}
        spec = a.get("/openapi.json").json()
        assert "/v1/jobs/lease" in spec["paths"] and spec["info"]["version"] == "1"
        assert a.get("/searches").status_code == 403  # an agent's token measures; it does not read
    with _client(hub, "reader") as reader:
        assert reader.get("/searches").json() == []
        missing = reader.get("/searches/nope")
        assert missing.status_code == 404 and missing.json()["error"] == "SearchNotFoundError"
