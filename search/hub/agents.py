"""Hub routes of an agent's own state: liveness and heartbeats."""

from __future__ import annotations

from fastapi import APIRouter

from latency_models.store import Outcome
from latency_models.wire import API_PREFIX, HeartbeatRequest, HeartbeatResponse, StatusBody
from search.hub.deps import CurrentAgent, Queue, Settings, errors

router = APIRouter(prefix=API_PREFIX)


@router.get("/health", responses=errors())
def health() -> StatusBody:
    """Liveness, without a token and without telling anything about the jobs."""
    return StatusBody(status=Outcome.OK)


@router.post("/agents/heartbeat", responses=errors(401, 403))
def heartbeat(body: HeartbeatRequest, me: CurrentAgent, queue: Queue, settings: Settings) -> HeartbeatResponse:
    held = queue.touch(me.id, environment=body.environment, job_id=body.job_id, lease_s=settings.lease_s,
                       progress=body.progress)
    return HeartbeatResponse(lease_held=held if body.job_id is not None else None)
