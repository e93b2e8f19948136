"""The measurement path end to end on real databases: the one meter factory, the typed result
through the store (cache and job queue) and back, and the hub's one-transaction acceptance."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from hardware_profiles import HardwareProfile, load_profile
from latency_models import (
    BaseArtifact,
    JobStatus,
    LocalMeter,
    Measurement,
    MeasurementKey,
    MeasurementResult,
    RemoteMeter,
    file_sha256,
    make_meter,
)
from latency_models.store import Outcome
from search.errors import StorageError
from search.storage import Repository
from search.storage.queue import DONE, LEASED, AgentRecord

SHA, BASE_SHA = "a" * 64, "b" * 64


def _result(profile: str, *, ratio: float | None = 0.5) -> MeasurementResult:
    measurement = Measurement(
        profile=profile, backend="onnxruntime", backend_version="1.20", device="Orin CPU x6", threads=4,
        median_us=123.5, p10_us=120.0, p90_us=130.25, mean_us=124.0, stdev_us=3.5, n=42, ci_low_us=122.0,
        ci_high_us=125.0, converged=False, elapsed_s=1.75, artifact_sha256=SHA, settings_fingerprint="f" * 16,
    )
    return MeasurementResult(measurement, ratio, None if ratio is None else (ratio * 0.98, ratio * 1.02))


def _agent(repo: Repository, profile: str) -> AgentRecord:
    found = repo.jobs.authenticate(repo.jobs.add_agent("device", profile))
    assert found is not None
    return found


def test_the_typed_result_survives_the_store(db_url: str) -> None:
    repo = Repository(db_url)
    try:
        # The cache: what it keeps comes back with its types (the ratio interval a tuple).
        key = MeasurementKey("sig", "f" * 16, BASE_SHA)
        stored = _result("p")
        assert repo.put_measurement(key, stored) == stored
        found = repo.find_measurement(key)
        assert found is not None and found.ratio == 0.5 and found.ratio_ci == stored.ratio_ci
        assert found.measurement == dataclasses.replace(stored.measurement, threads=None, elapsed_s=0.0)
        # A second writer of the key gets the first figures back, not an error.
        assert repo.put_measurement(key, _result("p", ratio=0.7)).ratio == 0.5
        # The job queue: the agent's result comes back from job_state exactly as posted.
        job_key = MeasurementKey("sig2", "f" * 16)
        job_id = repo.submit_job(job_key, profile="p", artifact_sha256=SHA)
        assert repo.submit_job(job_key, profile="p", artifact_sha256=SHA) == job_id  # joins it
        state = repo.job_state(job_id)
        assert state is not None and state.status is JobStatus.QUEUED and state.result is None
        agent = _agent(repo, "p")
        assert repo.jobs.lease(agent, 60) is not None
        posted = _result("p", ratio=None)
        assert repo.jobs.complete(agent, job_id, posted)[0] == Outcome.ACCEPTED
        state = repo.job_state(job_id)
        assert state is not None and state.status is JobStatus.DONE and state.result == posted
        cached = repo.find_measurement(job_key)
        assert cached is not None and cached.ratio is None and cached.measurement.median_us == 123.5
        assert repo.job_state(424242) is None
    finally:
        repo.close()


_FAIL_CACHE_INSERTS = {
    "sqlite": ["CREATE TRIGGER boom BEFORE INSERT ON hwprune_measurements "
               "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"],
    "postgresql": ["CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$ "
                   "LANGUAGE plpgsql",
                   "CREATE TRIGGER boom BEFORE INSERT ON hwprune_measurements FOR EACH ROW EXECUTE FUNCTION boom()"],
}


def test_an_accepted_result_is_job_done_and_cache_row_or_neither(db_url: str) -> None:
    repo = Repository(db_url)
    engine = create_engine(db_url)
    try:
        key = MeasurementKey("sig", "f" * 16, BASE_SHA)
        job_id = repo.submit_job(key, profile="p", artifact_sha256=SHA)
        agent = _agent(repo, "p")
        assert repo.jobs.lease(agent, 60) is not None
        # A failure between marking the job done and filing the cache row (a trigger that
        # refuses the row) must leave neither: the job still leased, no result, nothing cached.
        with engine.begin() as connection:
            for statement in _FAIL_CACHE_INSERTS[engine.dialect.name]:
                connection.execute(text(statement))
        with pytest.raises((StorageError, IntegrityError), match="injected failure"):
            repo.jobs.complete(agent, job_id, _result("p"))
        job = repo.jobs.get(job_id)
        assert job is not None and job.status == LEASED and job.result is None and job.done_by_agent_id is None
        assert repo.find_measurement(key) is None and repo.count_measurements() == 0
        assert [a.jobs_done for a in repo.jobs.list_agents()] == [0]
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER boom" + (" ON hwprune_measurements"
                                                           if engine.dialect.name == "postgresql" else "")))
        # Posted again, it is accepted whole.
        assert repo.jobs.complete(agent, job_id, _result("p"))[0] == Outcome.ACCEPTED
        job = repo.jobs.get(job_id)
        assert job is not None and job.status == DONE and job.result == _result("p")
        assert repo.find_measurement(key) is not None
        assert [a.jobs_done for a in repo.jobs.list_agents()] == [1]
    finally:
        engine.dispose()
        repo.close()


def test_one_factory_chooses_the_meter_from_the_profile(tmp_path: Path, fast_profile: HardwareProfile,
                                                        onnx_artifact: Path, onnx_artifact_wide: Path) -> None:
    repo = Repository(f"sqlite:///{tmp_path / 'm.db'}")
    base = BaseArtifact(onnx_artifact, file_sha256(onnx_artifact), "base-signature")
    wide_sha = file_sha256(onnx_artifact_wide)
    try:
        # Local: measured here, paired with the base, then answered from the cache.
        with make_meter(fast_profile, repo, base) as local:
            assert isinstance(local, LocalMeter) and not local.background
            base_us = local.measure_base().median_us
        with make_meter(fast_profile, repo, base, base_median_us=base_us) as local:
            first = local.start(onnx_artifact_wide, wide_sha, "wide").result()
            assert not first.cached and first.ratio > 1.5  # four times the channels
            again = local.start(onnx_artifact_wide, wide_sha, "wide").result()
            assert again.cached and again.ratio == first.ratio
            assert local.start(onnx_artifact, base.sha256, "base-signature").result().ratio == 1.0
        assert repo.jobs.jobs() == []  # nothing went to the queue

        # Remote: a job for an agent, paired with the base by sha256; start returns at once.
        remote_profile = load_profile("jetson-orin-ort-cpu")
        assert remote_profile.location == "remote"
        with make_meter(remote_profile, repo, base, base_median_us=200.0, poll_s=0.01) as remote:
            assert isinstance(remote, RemoteMeter) and remote.background
            pending = remote.start(onnx_artifact_wide, wide_sha, "wide")
            [job] = repo.jobs.jobs()
            assert (job.status, job.artifact_sha256, job.reference_sha256) == (JobStatus.QUEUED, wide_sha, base.sha256)
            agent = _agent(repo, remote_profile.name)
            assert repo.jobs.lease(agent, 60) is not None
            posted = _result(remote_profile.name, ratio=2.5)
            assert repo.jobs.complete(agent, job.id, posted)[0] == Outcome.ACCEPTED
            got = pending.result()
            assert (got.ratio, got.ratio_ci, got.median_us, got.latency_us) == (2.5, posted.ratio_ci, 123.5, 500.0)
            # The accepted result is in the cache under the job's key: the next trial's hit.
            assert remote.start(onnx_artifact_wide, wide_sha, "wide").result().cached
    finally:
        repo.close()
