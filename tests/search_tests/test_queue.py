"""Job-queue semantics on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from latency_models import Measurement, MeasurementResult
from latency_models.store import Outcome
from search.storage import Repository
from search.storage.queue import DONE, FAILED, LEASED, QUEUED, AgentRecord, JobQueue

SHA = "a" * 64


def _result(device: str) -> MeasurementResult:
    return MeasurementResult(Measurement(
        profile="p", backend="onnxruntime", backend_version="1", device=device, threads=1, median_us=100.0,
        p10_us=90.0, p90_us=110.0, mean_us=100.0, stdev_us=5.0, n=10, ci_low_us=98.0, ci_high_us=102.0,
        converged=True, elapsed_s=0.1, artifact_sha256=SHA, settings_fingerprint="f" * 16))


@pytest.fixture
def queue(db_url: str) -> JobQueue:
    repo = Repository(db_url)
    return JobQueue(repo.engine, expire_every_s=0.0)  # look for expired leases on every call


def _agent(queue: JobQueue, name: str, profile: str = "p") -> AgentRecord:
    token = queue.add_agent(name, profile)
    found = queue.authenticate(token)
    assert found is not None
    return found


def _submit(queue: JobQueue, index: int, *, max_attempts: int = 3, profile: str = "p") -> int:
    return queue.submit(signature=f"sig{index}", profile=profile, profile_fingerprint="f" * 16,
                        artifact_sha256=SHA, max_attempts=max_attempts)


def test_tokens_are_stored_hashed_and_revocable(queue: JobQueue, db_url: str) -> None:
    token = queue.add_agent("a", "p")
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT token_hash FROM hwprune_agents")).scalar_one()
    engine.dispose()
    assert token not in stored and len(stored) == 64
    assert queue.authenticate("not-a-token") is None
    queue.revoke_agent("a")
    assert queue.authenticate(token) is None


def test_concurrent_leases_never_share_a_job(queue: JobQueue) -> None:
    agents = [_agent(queue, f"a{i}") for i in range(6)]
    ids = {_submit(queue, i) for i in range(30)}
    leased: list[int] = []
    lock = threading.Lock()

    def drain(agent: AgentRecord) -> None:
        while (job := queue.lease(agent, 60)) is not None:
            with lock:
                leased.append(job.id)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(drain, agents))
    assert sorted(leased) == sorted(ids)  # every job exactly once


def test_same_key_joins_the_existing_job(queue: JobQueue) -> None:
    assert _submit(queue, 1) == _submit(queue, 1)
    assert _submit(queue, 1) != _submit(queue, 2)


def test_expired_lease_goes_back_then_fails_past_the_cap(queue: JobQueue) -> None:
    a, b = _agent(queue, "a"), _agent(queue, "b")
    job_id = _submit(queue, 1, max_attempts=2)
    first = queue.lease(a, 0.1)
    assert first is not None and first.attempts == 1
    time.sleep(0.3)
    second = queue.lease(b, 0.1)
    assert second is not None and second.id == job_id and second.attempts == 2
    time.sleep(0.3)
    assert queue.lease(a, 0.1) is None
    job = queue.get(job_id)
    assert job is not None and job.status == FAILED
    assert "lease expired on every attempt" in (job.last_error or "")
    # A result from the agent whose lease expired long ago is refused.
    assert queue.complete(a, job_id, _result("a"))[0] == Outcome.NOT_HOLDER


def test_result_accepted_once_from_the_holder(queue: JobQueue) -> None:
    a, b = _agent(queue, "a"), _agent(queue, "b")
    job_id = _submit(queue, 1)
    assert queue.lease(a, 60) is not None
    assert queue.complete(b, job_id, _result("b"))[0] == Outcome.NOT_HOLDER
    assert queue.complete(a, job_id, _result("a"))[0] == Outcome.ACCEPTED
    assert queue.complete(a, job_id, _result("a"))[0] == Outcome.DUPLICATE
    assert queue.complete(b, job_id, _result("b"))[0] == Outcome.NOT_HOLDER
    job = queue.get(job_id)
    assert job is not None and job.status == DONE and job.result == _result("a")
    assert [x.jobs_done for x in queue.list_agents()] == [1, 0]
    assert queue.complete(a, 9999, _result("a"))[0] == Outcome.UNKNOWN


def test_failure_requeues_until_the_cap(queue: JobQueue) -> None:
    a = _agent(queue, "a")
    job_id = _submit(queue, 1, max_attempts=2)
    assert queue.lease(a, 60) is not None
    assert queue.fail(a, job_id, "backend crashed") == Outcome.ACCEPTED
    assert queue.get(job_id).status == QUEUED  # type: ignore[union-attr]
    assert queue.lease(a, 60) is not None
    queue.fail(a, job_id, "backend crashed again")
    job = queue.get(job_id)
    assert job is not None and job.status == FAILED and job.last_error == "backend crashed again"
    # A new request for the same key queues it again with fresh attempts.
    assert _submit(queue, 1, max_attempts=2) == job_id
    assert queue.get(job_id).status == QUEUED  # type: ignore[union-attr]


def test_release_and_revoke_return_jobs_without_spending_attempts(queue: JobQueue) -> None:
    a, b = _agent(queue, "a"), _agent(queue, "b")
    job_id = _submit(queue, 1)
    queue.lease(a, 60)
    assert queue.release(b, job_id) == Outcome.NOT_HOLDER
    assert queue.release(a, job_id) == Outcome.ACCEPTED
    job = queue.get(job_id)
    assert job is not None and job.status == QUEUED and job.attempts == 0
    queue.lease(a, 60)
    queue.revoke_agent("a")
    job = queue.get(job_id)
    assert job is not None and job.status == QUEUED and job.attempts == 0
    assert queue.lease(b, 60) is not None


def test_lease_only_for_own_profile_and_heartbeat_extends(queue: JobQueue) -> None:
    a = _agent(queue, "a", profile="p")
    other = _submit(queue, 1, profile="q")
    assert queue.lease(a, 60) is None
    job_id = _submit(queue, 2)
    job = queue.lease(a, 0.5)
    assert job is not None and job.id == job_id and job.status == LEASED
    assert queue.touch(a.id, job_id=job_id, lease_s=60)
    time.sleep(0.7)
    b = _agent(queue, "b")
    assert queue.lease(b, 60) is None  # the heartbeat kept the lease
    assert queue.get(other).status == QUEUED  # type: ignore[union-attr]
    assert not queue.touch(b.id, job_id=job_id, lease_s=60)  # not b's lease
