"""The hub: HTTP API for remote profiler agents, and read endpoints over stored searches.

Every endpoint but ``/v1/health`` needs a bearer token (stored hashed). Agents act only for
themselves: they lease jobs of their own profile, download only artifacts their leased jobs need,
and post results only for jobs they hold. Reader tokens (``hwprune agents add NAME --reader``)
may only read searches. Request bodies are capped before anything else looks at them, and a
result is checked (finite, ordered, the job's own artifact and profile, plausible against the
base model's cached latency) before it reaches the measurement cache. Errors answer
``{"error": <type>, "detail": <message>}``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from latency_models.wire import (
    API_PREFIX,
    BATCH,
    MAX_BATCH_RESULT_BYTES,
    MAX_ID,
    MAX_RESULT_BYTES,
    MEASURE,
    BatchResultBody,
    ErrorBody,
    FailureBody,
    HeartbeatRequest,
    HeartbeatResponse,
    JobSpec,
    LeaseRequest,
    ResultBody,
    StatusBody,
    clean_text,
)
from search.errors import SearchError, SearchNotFoundError, StorageError
from search.storage import Repository
from search.storage.queue import AGENT, READER, AgentRecord, JobQueue, JobRecord, Outcome

logger = logging.getLogger(__name__)

# A paired ratio outside this band, or one that disagrees with the base model's cached median by
# more than PLAUSIBLE_FACTOR, is flagged instead of trusted: pruning makes a model at most a few
# times faster, never 50 times, and a candidate is never several times slower than its base.
PLAUSIBLE_RATIO = (0.02, 5.0)
PLAUSIBLE_FACTOR = 3.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HubSettings:
    """Hub behaviour: how long a lease lasts without a heartbeat, the request body cap, the
    worker threads that serve requests."""

    db_url: str
    lease_s: float = 60.0
    max_result_bytes: int = MAX_RESULT_BYTES
    # A batch job's result (one figure per layer shape and plan), on its own endpoint only.
    max_batch_result_bytes: int = MAX_BATCH_RESULT_BYTES
    # The artifact store agents download from; None: search.config.artifacts_url(db_url).
    artifacts_url: str | None = None
    threads: int = 8


# A refused body is still read to its end and thrown away, up to DRAIN_BYTES past the cap and
# DRAIN_SECONDS, before the 413 goes out. Closing a socket with unread bytes makes the kernel
# answer with a reset, which can overtake the 413 on the wire and leave the client with
# "connection reset" instead of the reason (seen in CI on a loaded machine). Past either bound the
# hub stops reading, so that no client makes it read megabytes or wait on a trickle; such a
# client may see the reset.
DRAIN_BYTES = 1 << 20
DRAIN_SECONDS = 2.0


class BodyCap:
    """ASGI middleware: read at most ``limit`` bytes of any request body (``batch_limit`` for a
    path ending in ``/batch-result``), before routing, authentication or parsing; answer 413 past
    it. The body is then replayed to the app."""

    def __init__(self, app: ASGIApp, limit: int, batch_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.batch_limit = limit if batch_limit is None else batch_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.batch_limit if str(scope.get("path", "")).endswith("/batch-result") else self.limit
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if declared.isdigit() and int(declared) <= limit + DRAIN_BYTES:
                await _drain(receive, 0, limit + DRAIN_BYTES)
            await self._refuse(send, limit)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, size, limit + DRAIN_BYTES)
                await self._refuse(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # the client's disconnect, if it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        response = JSONResponse({"error": "PayloadTooLarge", "detail": f"request body over {limit} bytes"},
                                status_code=413, headers={"Connection": "close"})
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _drain(receive: Receive, read: int, most: int) -> None:
    """Read and discard the rest of a refused body (``read`` bytes of it are already read) until
    it ends, more than ``most`` bytes in all are read, or DRAIN_SECONDS pass."""
    with anyio.move_on_after(DRAIN_SECONDS):
        while read <= most:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


# Declared through FastAPI's HTTPBearer so that the OpenAPI document names the scheme; the
# checks themselves are ours (auto_error would answer 403 where 401 is right).
_bearer = HTTPBearer(auto_error=False, description="An agent's token, or a reader's for /v1/searches.")


async def _holder_of(request: Request,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> AgentRecord:
    if credentials is None or not credentials.credentials.strip():
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    token = credentials.credentials.strip()
    queue: JobQueue = request.app.state.hub["queue"]
    found = await run_in_threadpool(queue.authenticate, token)
    if found is None:
        raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return found


async def _current_agent(found: Annotated[AgentRecord, Depends(_holder_of)]) -> AgentRecord:
    """The agent whose bearer token came with the request; 401 otherwise, 403 for a reader."""
    if found.role != AGENT:
        raise HTTPException(403, "a reader token cannot act as an agent")
    return found


async def _current_reader(found: Annotated[AgentRecord, Depends(_holder_of)]) -> AgentRecord:
    """A reader token; agents' tokens measure, they have no business reading searches."""
    if found.role != READER:
        raise HTTPException(403, "this endpoint needs a reader token (hwprune agents add NAME --reader)")
    return found


CurrentAgent = Annotated[AgentRecord, Depends(_current_agent)]
CurrentReader = Annotated[AgentRecord, Depends(_current_reader)]
JobIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="A job id from a lease.")]
SearchName = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Sha256Path = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]

_DESCRIPTIONS = {
    400: "A malformed request (a body that is not JSON), or one that cannot be served as asked.",
    401: "Missing, unknown or revoked bearer token.",
    403: "The token may not do this (another profile, a job it does not hold, a reader token).",
    404: "No such job, artifact or search.",
    409: "Another agent holds or finished the job, or the result does not answer it (another job's artifact, "
         "profile or kind, a paired job without its ratio).",
    413: "Request body over the hub's cap.",
    422: "The request does not match its schema.",
    503: "The database is unreachable.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]}
            for code in sorted({*codes, 400, 413, 422, 503})}


class _NotTheAnswer(Exception):
    """A well-formed result that does not answer the job it was posted for."""


def _one_line(text: str, limit: int = 500) -> str:
    return clean_text(" ".join(str(text).split()), limit)


def create_app(settings: HubSettings) -> FastAPI:
    """The hub's FastAPI application over the database at ``settings.db_url``."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Requests run their database work in worker threads. Python runs one at a time, so
        # more threads than the database can use only add hand-offs between them.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        repo = Repository(settings.db_url, artifacts=settings.artifacts_url)
        state["repo"] = repo
        state["queue"] = repo.jobs
        try:
            yield
        finally:
            repo.close()

    app = FastAPI(title="hwprune hub", version="1", lifespan=lifespan,
                  openapi_url=f"{API_PREFIX}/openapi.json", docs_url=f"{API_PREFIX}/docs")
    app.state.hub = state
    app.add_middleware(BodyCap, limit=settings.max_result_bytes,  # type: ignore[arg-type]
                       batch_limit=settings.max_batch_result_bytes)

    def queue() -> JobQueue:
        return state["queue"]  # type: ignore[no-any-return]

    def repo() -> Repository:
        return state["repo"]  # type: ignore[no-any-return]

    def study(name: str) -> tuple[Any, Any]:
        """A search's record and study, through one Optuna storage opened on first use."""
        from search.study.runtime import Runtime, load_study, optuna_storage

        record = repo().get_search(name)
        runtime = Runtime(db_url=settings.db_url)
        if "optuna" not in state:
            state["optuna"] = optuna_storage(runtime)
        return record, load_study(record, runtime, storage=state["optuna"])

    # Starlette's own HTTPException (FastAPI's derives from it): FastAPI raises that one for a
    # body it cannot parse, and it must answer in the same shape as ours.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "HTTPException", "detail": _one_line(exc.detail)},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]]
        return JSONResponse({"error": "RequestValidationError", "detail": _one_line("; ".join(problems))},
                            status_code=422)

    @app.exception_handler(SearchError)
    async def search_error(_request: Request, exc: SearchError) -> JSONResponse:
        status = (404 if isinstance(exc, SearchNotFoundError) else 503 if isinstance(exc, StorageError)
                  else 400)
        return JSONResponse({"error": type(exc).__name__, "detail": _one_line(str(exc))}, status_code=status)

    # --- agents -----------------------------------------------------------------------------

    @app.get(f"{API_PREFIX}/health", responses=_errors())
    def health() -> StatusBody:
        """Liveness, without a token and without telling anything about the jobs."""
        return StatusBody(status="ok")

    @app.post(f"{API_PREFIX}/agents/heartbeat", responses=_errors(401, 403))
    def heartbeat(body: HeartbeatRequest, me: CurrentAgent) -> HeartbeatResponse:
        held = queue().touch(me.id, environment=body.environment, job_id=body.job_id, lease_s=settings.lease_s,
                             progress=body.progress)
        return HeartbeatResponse(lease_held=held if body.job_id is not None else None)

    # Fields at their defaults stay out of a lease (a measure job's ``kind``, ``batch``): agents
    # that predate them refuse unknown fields.
    @app.post(f"{API_PREFIX}/jobs/lease", response_model=JobSpec, response_model_exclude_defaults=True,
              responses={204: {"description": "No job queued for this profile: poll again later."},
                         **_errors(401, 403)})
    def lease(body: LeaseRequest, me: CurrentAgent) -> JobSpec | Response:
        if body.profile != me.profile:
            raise HTTPException(403, f"this token serves profile {me.profile!r}, not {body.profile!r}")
        job = queue().lease(me, settings.lease_s)
        if job is None:
            return Response(status_code=204)
        return JobSpec(id=job.id, profile=job.profile, profile_fingerprint=job.profile_fingerprint,
                       artifact_sha256=job.artifact_sha256, reference_sha256=job.reference_sha256,
                       lease_s=settings.lease_s, attempt=job.attempts, kind=job.kind, batch=job.batch)

    @app.get(f"{API_PREFIX}/artifacts/{{sha256}}", response_class=Response,
             responses={200: {"description": "The ONNX bytes.",
                              "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}},
                        **_errors(401, 403, 404)})
    def artifact(sha256: Sha256Path, me: CurrentAgent) -> Response:
        if not queue().holds_artifact(me, sha256):
            raise HTTPException(403, "no job leased by this agent needs that artifact")
        content = repo().get_artifact(sha256)  # from the artifact store, checked against its name
        if content is None:
            raise HTTPException(404, f"no artifact {sha256}")
        return Response(content, media_type="application/octet-stream")

    def _answer(outcome: str, job_id: int) -> StatusBody:
        if outcome == Outcome.UNKNOWN:
            raise HTTPException(404, f"no job {job_id}")
        if outcome == Outcome.NOT_HOLDER:
            raise HTTPException(409, f"job {job_id} is not leased by this agent")
        return StatusBody(status=outcome)

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/result", responses=_errors(401, 403, 404, 409))
    def result(job_id: JobIdPath, body: ResultBody, me: CurrentAgent) -> StatusBody:
        """Post the measurement of a held job. A result that does not answer the job (another job's
        artifact or profile, a paired job without its ratio) is refused with 409; inconsistent or
        implausible ones are kept on the job, answered ``flagged`` and measured again; only the rest
        reach the cache. (422 is for bodies outside the published schema alone.)"""
        return _answer(_accept(job_id, me, body), job_id)

    def _accept(job_id: int, me: AgentRecord, body: ResultBody) -> str:
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
        with _failing_the_job(me, job_id):
            outcome, _ = queue().complete(me, job_id, body.to_result(), judge=judge)
        return outcome

    @contextmanager
    def _failing_the_job(me: AgentRecord, job_id: int) -> Iterator[None]:
        """A schema-valid result that does not answer its job fails the job (retried or failed, as
        an agent's failure would) and is answered 409: a conflict with the job, not bad input."""
        try:
            yield
        except _NotTheAnswer as exc:
            queue().fail(me, job_id, f"result refused by the hub: {exc}")
            raise HTTPException(409, f"result for job {job_id} refused: {exc}") from None

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

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/batch-result", responses=_errors(401, 403, 404, 409))
    def batch_result(job_id: JobIdPath, body: BatchResultBody, me: CurrentAgent) -> StatusBody:
        """Post the figures of a held batch job. Figures that do not answer the batch (another
        profile, a count that does not match, a ratio outside the plausible band) are refused
        with 409, and the agent fails the job; the rest are kept on the job."""
        def check(job: JobRecord) -> None:
            if job.kind != BATCH or job.batch is None:
                raise _NotTheAnswer(f"job {job_id} is not a batch job: post its result to /jobs/{job_id}/result")
            problems = body.problems_for(profile=job.profile, spec=job.batch)
            low, high = PLAUSIBLE_RATIO
            problems += [f"plan {i}'s ratio {f.ratio:.4g} to the base model is outside [{low}, {high}]"
                         for i, f in enumerate(body.plans) if not low <= f.ratio <= high][:3]
            if problems:
                raise _NotTheAnswer("; ".join(problems))

        with _failing_the_job(me, job_id):
            return _answer(queue().complete_batch(me, job_id, body, check=check), job_id)

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/failure", responses=_errors(401, 403, 404, 409))
    def failure(job_id: JobIdPath, body: FailureBody, me: CurrentAgent) -> StatusBody:
        return _answer(queue().fail(me, job_id, body.error), job_id)

    @app.post(f"{API_PREFIX}/jobs/{{job_id}}/release", responses=_errors(401, 403, 404, 409))
    def release(job_id: JobIdPath, me: CurrentAgent) -> StatusBody:
        return _answer(queue().release(me, job_id), job_id)

    # --- read endpoints over searches (reader tokens) ---------------------------------------

    @app.get(f"{API_PREFIX}/searches", responses=_errors(401, 403))
    def searches(me: CurrentReader) -> list[dict[str, Any]]:
        return [{"name": r.name, "targets": r.config["targets"], "objective": r.config["objective"],
                 "created_at": r.created_at.isoformat()} for r in repo().list_searches()]

    @app.get(f"{API_PREFIX}/searches/{{name}}", responses=_errors(401, 403, 404))
    def search(name: SearchName, me: CurrentReader) -> dict[str, Any]:
        from search.study.read import summary

        return dict(_finite(summary(*study(name))))

    @app.get(f"{API_PREFIX}/searches/{{name}}/trials", responses=_errors(401, 403, 404))
    def trials(name: SearchName, me: CurrentReader) -> list[dict[str, Any]]:
        _, found = study(name)
        return [_finite({"trial": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                         "user_attrs": t.user_attrs}) for t in found.get_trials(deepcopy=False)]

    @app.get(f"{API_PREFIX}/searches/{{name}}/pareto", responses=_errors(400, 401, 403, 404))
    def pareto(name: SearchName, me: CurrentReader,
               target: Annotated[str | None, Query(max_length=100)] = None) -> list[dict[str, Any]]:
        from search.study.read import pareto_rows

        record, found = study(name)
        chosen = target or record.config["targets"][0]
        if chosen not in record.config["targets"]:
            # a well-formed name of no target of this search: no such front (404), not bad input
            raise HTTPException(404, f"target {_one_line(chosen, 100)!r} is not one of this search's: "
                                     f"{', '.join(record.config['targets'])}")
        return [_finite(row) for row in pareto_rows(record, found, chosen)]

    return app


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a stored non-finite figure is sent as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


DB_ENV = "HWPRUNE_HUB_DB"
LEASE_ENV = "HWPRUNE_HUB_LEASE_S"


def app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes (``hwprune serve --workers N``): each worker builds
    its app from the settings ``hwprune serve`` put in the environment."""
    return create_app(HubSettings(db_url=os.environ[DB_ENV], lease_s=float(os.environ.get(LEASE_ENV, "60"))))
