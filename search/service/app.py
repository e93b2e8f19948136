"""The hub: HTTP API for remote profiler agents, and read endpoints over stored searches.

Agents authenticate with a bearer token (stored hashed) and act only for themselves: they lease
jobs of their own profile, download only artifacts their leased jobs need, and post results only
for jobs they hold. Errors answer ``{"error": <type>, "detail": <message>}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from latency_models.wire import (
    API_PREFIX,
    MAX_RESULT_BYTES,
    FailureBody,
    HeartbeatRequest,
    HeartbeatResponse,
    JobSpec,
    LeaseRequest,
    ResultBody,
    StatusBody,
)
from search.errors import SearchError, SearchNotFoundError, StorageError
from search.storage import Repository
from search.storage.queue import AgentRecord, JobQueue, Outcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HubSettings:
    """Hub behaviour: how long a lease lasts without a heartbeat, the result size cap."""

    db_url: str
    lease_s: float = 60.0
    max_result_bytes: int = MAX_RESULT_BYTES


async def _current_agent(request: Request) -> AgentRecord:
    """The agent whose bearer token came with the request; 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    queue: JobQueue = request.app.state.hub["queue"]
    found = await run_in_threadpool(queue.authenticate, token.strip())
    if found is None:
        raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return found


CurrentAgent = Annotated[AgentRecord, Depends(_current_agent)]
BodyT = TypeVar("BodyT", bound=BaseModel)


def create_app(settings: HubSettings) -> FastAPI:
    """The hub's FastAPI application over the database at ``settings.db_url``."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        repo = Repository(settings.db_url)
        state["repo"] = repo
        state["queue"] = JobQueue(repo.engine)
        try:
            yield
        finally:
            repo.close()

    app = FastAPI(title="hwprune hub", version="1", lifespan=lifespan,
                  openapi_url=f"{API_PREFIX}/openapi.json", docs_url=f"{API_PREFIX}/docs")
    app.state.hub = state

    def queue() -> JobQueue:
        return state["queue"]  # type: ignore[no-any-return]

    def repo() -> Repository:
        return state["repo"]  # type: ignore[no-any-return]

    def study(name: str) -> tuple[Any, Any]:
        """A search's record and study, through one Optuna storage opened on first use."""
        from search.controller import Runtime, load_study, optuna_storage

        record = repo().get_search(name)
        runtime = Runtime(db_url=settings.db_url)
        if "optuna" not in state:
            state["optuna"] = optuna_storage(runtime)
        return record, load_study(record, runtime, storage=state["optuna"])

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": "HTTPException", "detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "RequestValidationError", "detail": str(exc.errors())[:2000]}, status_code=422)

    @app.exception_handler(SearchError)
    async def search_error(_request: Request, exc: SearchError) -> JSONResponse:
        status = 404 if isinstance(exc, SearchNotFoundError) else 503 if isinstance(exc, StorageError) else 400
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status)

    # --- agents -----------------------------------------------------------------------------

    @app.get(f"{API_PREFIX}/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "jobs": queue().counts()}

    @app.post(f"{API_PREFIX}/agents/heartbeat")
    def heartbeat(body: HeartbeatRequest, me: CurrentAgent) -> HeartbeatResponse:
        held = queue().touch(me.id, environment=body.environment, job_id=body.job_id, lease_s=settings.lease_s)
        return HeartbeatResponse(lease_held=held if body.job_id is not None else None)

    @app.post(f"{API_PREFIX}/jobs/lease", response_model=None)
    def lease(body: LeaseRequest, me: CurrentAgent) -> JobSpec | Response:
        if body.profile != me.profile:
            raise HTTPException(403, f"this token serves profile {me.profile!r}, not {body.profile!r}")
        job = queue().lease(me, settings.lease_s)
        if job is None:
            return Response(status_code=204)
        return JobSpec(id=job.id, profile=job.profile, profile_fingerprint=job.profile_fingerprint,
                       artifact_sha256=job.artifact_sha256, reference_sha256=job.reference_sha256,
                       lease_s=settings.lease_s, attempt=job.attempts)

    @app.get(f"{API_PREFIX}/artifacts/{{sha256}}")
    def artifact(sha256: str, me: CurrentAgent) -> Response:
        if not queue().holds_artifact(me, sha256):
            raise HTTPException(403, "no job leased by this agent needs that artifact")
        content = repo().get_artifact(sha256)
        if content is None:
            raise HTTPException(404, f"no artifact {sha256}")
        return Response(content, media_type="application/octet-stream")

    async def _bounded_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_result_bytes:
            raise HTTPException(413, f"body over {settings.max_result_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_result_bytes:
                raise HTTPException(413, f"body over {settings.max_result_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _answer(outcome: str, job_id: int) -> StatusBody:
        if outcome == Outcome.UNKNOWN:
            raise HTTPException(404, f"no job {job_id}")
        if outcome == Outcome.NOT_HOLDER:
            raise HTTPException(409, f"job {job_id} is not leased by this agent")
        return StatusBody(status=outcome)

    async def _parse(request: Request, schema: type[BodyT]) -> BodyT:
        # Bodies are read by hand (not as FastAPI parameters) so the size cap applies first.
        raw = await _bounded_body(request)
        try:
            return schema.model_validate_json(raw)
        except ValidationError as exc:
            raise HTTPException(422, f"invalid {schema.__name__}: {exc.errors()[:3]}") from exc

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/result")
    async def result(job_id: int, request: Request, me: CurrentAgent) -> StatusBody:
        body = await _parse(request, ResultBody)
        outcome = await run_in_threadpool(_accept, job_id, me, body)
        return _answer(outcome, job_id)

    def _accept(job_id: int, me: AgentRecord, body: ResultBody) -> str:
        outcome, job = queue().complete(me, job_id, body.model_dump(mode="json"))
        if outcome == Outcome.ACCEPTED and job is not None:
            repo().put_measurement(
                signature=job.signature, profile_fingerprint=job.profile_fingerprint,
                measurement=body.measurement, reference_sha256=job.reference_sha256,
                ratio=body.ratio, ratio_ci=body.ratio_ci,
            )
        return outcome

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/failure")
    async def failure(job_id: int, request: Request, me: CurrentAgent) -> StatusBody:
        body = await _parse(request, FailureBody)
        return _answer(await run_in_threadpool(queue().fail, me, job_id, body.error), job_id)

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/release")
    def release(job_id: int, me: CurrentAgent) -> StatusBody:
        return _answer(queue().release(me, job_id), job_id)

    # --- read endpoints over searches -------------------------------------------------------

    @app.get(f"{API_PREFIX}/searches")
    def searches() -> list[dict[str, Any]]:
        return [{"name": r.name, "targets": r.config["targets"], "objective": r.config["objective"],
                 "created_at": r.created_at.isoformat()} for r in repo().list_searches()]

    @app.get(f"{API_PREFIX}/searches/{{name}}")
    def search(name: str) -> dict[str, Any]:
        from search.controller import summary

        return summary(*study(name))

    @app.get(f"{API_PREFIX}/searches/{{name}}/trials")
    def trials(name: str) -> list[dict[str, Any]]:
        _, found = study(name)
        return [{"trial": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                 "user_attrs": t.user_attrs} for t in found.get_trials(deepcopy=False)]

    @app.get(f"{API_PREFIX}/searches/{{name}}/pareto")
    def pareto(name: str, target: str | None = None) -> list[dict[str, Any]]:
        from search.controller import pareto_rows

        record, found = study(name)
        return pareto_rows(record, found, target or record.config["targets"][0])

    return app


DB_ENV = "HWPRUNE_HUB_DB"
LEASE_ENV = "HWPRUNE_HUB_LEASE_S"


def app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes (``hwprune serve --workers N``): each worker builds
    its app from the settings ``hwprune serve`` put in the environment."""
    return create_app(HubSettings(db_url=os.environ[DB_ENV], lease_s=float(os.environ.get(LEASE_ENV, "60"))))
