"""Hub routes of measurement jobs: an agent leases one of its profile's jobs and posts its result,
its failure or its release. A result is checked (finite, ordered, the job's own artifact and
profile, plausible against the base model's cached latency) before it reaches the cache."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fastapi import APIRouter, HTTPException, Response

from latency_models.store import Outcome
from latency_models.wire import (
    API_PREFIX,
    BATCH,
    MEASURE,
    BatchResultBody,
    FailureBody,
    JobSpec,
    LeaseRequest,
    ResultBody,
    StatusBody,
)
from search.hub.deps import CurrentAgent, JobIdPath, Queue, Settings, errors
from search.storage.queue import AgentRecord, JobQueue, JobRecord

logger = logging.getLogger(__name__)

router = APIRouter(prefix=f"{API_PREFIX}/jobs")

# A paired ratio outside this band, or one that disagrees with the base model's cached median by
# more than PLAUSIBLE_FACTOR, is flagged instead of trusted: pruning makes a model at most a few
# times faster, never 50 times, and a candidate is never several times slower than its base.
PLAUSIBLE_RATIO = (0.02, 5.0)
PLAUSIBLE_FACTOR = 3.0


# Fields at their defaults stay out of a lease (a measure job's ``kind``, ``batch``): agents
# that predate them refuse unknown fields.
@router.post("/lease", response_model=JobSpec, response_model_exclude_defaults=True,
             responses={204: {"description": "No job queued for this profile: poll again later."},
                        **errors(401, 403)})
def lease(body: LeaseRequest, me: CurrentAgent, queue: Queue, settings: Settings) -> JobSpec | Response:
    if body.profile != me.profile:
        raise HTTPException(403, f"this token serves profile {me.profile!r}, not {body.profile!r}")
    job = queue.lease(me, settings.lease_s)
    if job is None:
        return Response(status_code=204)
    return JobSpec(id=job.id, profile=job.profile, profile_fingerprint=job.profile_fingerprint,
                   artifact_sha256=job.artifact_sha256, reference_sha256=job.reference_sha256,
                   lease_s=settings.lease_s, attempt=job.attempts, kind=job.kind, batch=job.batch)


def _answer(outcome: Outcome, job_id: int) -> StatusBody:
    if outcome == Outcome.UNKNOWN:
        raise HTTPException(404, f"no job {job_id}")
    if outcome == Outcome.NOT_HOLDER:
        raise HTTPException(409, f"job {job_id} is not leased by this agent")
    return StatusBody(status=outcome)


@router.post("/{job_id}/result", responses=errors(401, 403, 404, 409))
def result(job_id: JobIdPath, body: ResultBody, me: CurrentAgent, queue: Queue) -> StatusBody:
    """Post the measurement of a held job. A result that does not answer the job (another job's
    artifact or profile, a paired job without its ratio) is refused with 409; inconsistent or
    implausible ones are kept on the job, answered ``flagged`` and measured again; only the rest
    reach the cache. (422 is for bodies outside the published schema alone.)"""
    with _failing_the_job(queue, me, job_id):
        return _answer(_accept(queue, job_id, me, body), job_id)


class _NotTheAnswer(Exception):
    """A well-formed result that does not answer the job it was posted for."""


@contextmanager
def _failing_the_job(queue: JobQueue, me: AgentRecord, job_id: int) -> Iterator[None]:
    """A schema-valid result that does not answer its job fails the job (retried or failed, as an
    agent's failure would) and is answered 409: a conflict with the job, not bad input."""
    try:
        yield
    except _NotTheAnswer as exc:
        queue.fail(me, job_id, f"result refused by the hub: {exc}")
        raise HTTPException(409, f"result for job {job_id} refused: {exc}") from None


def _accept(queue: JobQueue, job_id: int, me: AgentRecord, body: ResultBody) -> Outcome:
    def judge(job: JobRecord, base_median_us: Callable[[], float | None]) -> str | None:
        if job.kind != MEASURE:
            raise _NotTheAnswer(f"job {job_id} is a {job.kind} job: post its result to "
                                f"/jobs/{job_id}/{job.kind}-result")
        problems = body.problems_for(profile=job.profile, artifact_sha256=job.artifact_sha256,
                                     paired=bool(job.reference_sha256))
        if problems:
            raise _NotTheAnswer("; ".join(problems))
        doubt = "; ".join(body.inconsistencies()) or _implausible(body, base_median_us)
        if doubt is not None:
            logger.warning("job %d: flagged a result from %s: %s", job_id, me.name, doubt)
        return doubt

    # One store call: the job done and its result cached in one transaction (or flagged).
    outcome, _ = queue.complete(me, job_id, body.to_result(), judge=judge)
    return outcome


def _implausible(body: ResultBody, base_median_us: Callable[[], float | None]) -> str | None:
    if body.ratio is None:
        return None
    low, high = PLAUSIBLE_RATIO
    if not low <= body.ratio <= high:
        return f"ratio {body.ratio:.4g} to the base model is outside [{low}, {high}]"
    base_us = base_median_us()
    if base_us is None:
        return None
    expected = body.ratio * base_us
    if abs(math.log(body.measurement.median_us / expected)) > math.log(PLAUSIBLE_FACTOR):
        return (f"median {body.measurement.median_us:.4g} us disagrees with ratio {body.ratio:.4g} x the "
                f"base model's cached {base_us:.4g} us by more than {PLAUSIBLE_FACTOR:g}x")
    return None


@router.post("/{job_id}/batch-result", responses=errors(401, 403, 404, 409))
def batch_result(job_id: JobIdPath, body: BatchResultBody, me: CurrentAgent, queue: Queue) -> StatusBody:
    """Post the figures of a held batch job. Figures that do not answer the batch (another
    profile, a count that does not match, a ratio outside the plausible band) are refused
    with 409, and the hub fails the job; the rest are kept on the job."""
    def check(job: JobRecord) -> None:
        if job.kind != BATCH or job.batch is None:
            raise _NotTheAnswer(f"job {job_id} is not a batch job: post its result to /jobs/{job_id}/result")
        problems = body.problems_for(profile=job.profile, spec=job.batch)
        low, high = PLAUSIBLE_RATIO
        problems += [f"plan {i}'s ratio {f.ratio:.4g} to the base model is outside [{low}, {high}]"
                     for i, f in enumerate(body.plans) if not low <= f.ratio <= high][:3]
        if problems:
            raise _NotTheAnswer("; ".join(problems))

    with _failing_the_job(queue, me, job_id):
        return _answer(queue.complete_batch(me, job_id, body, check=check), job_id)


@router.post("/{job_id}/failure", responses=errors(401, 403, 404, 409))
def failure(job_id: JobIdPath, body: FailureBody, me: CurrentAgent, queue: Queue) -> StatusBody:
    return _answer(queue.fail(me, job_id, body.error), job_id)


@router.post("/{job_id}/release", responses=errors(401, 403, 404, 409))
def release(job_id: JobIdPath, me: CurrentAgent, queue: Queue) -> StatusBody:
    return _answer(queue.release(me, job_id), job_id)
