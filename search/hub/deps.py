"""What every hub route depends on: its settings, the repository and queue of the running app,
the bearer-token checks, the path parameters and the error responses it documents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from latency_models.store import Role
from latency_models.wire import MAX_BATCH_RESULT_BYTES, MAX_ID, MAX_RESULT_BYTES, ErrorBody, clean_text
from search.storage import Repository, SearchRecord
from search.storage.queue import AgentRecord, JobQueue

if TYPE_CHECKING:  # the read side loads optuna when a search is first read
    import optuna


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


def settings_of(request: Request) -> HubSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


def queue_of(request: Request) -> JobQueue:
    return request.app.state.hub["queue"]  # type: ignore[no-any-return]


def repo_of(request: Request) -> Repository:
    return request.app.state.hub["repo"]  # type: ignore[no-any-return]


def study_of(request: Request, name: str) -> tuple[SearchRecord, optuna.Study]:
    """A search's record and study, through one Optuna storage opened on first use."""
    from search.study.runtime import Runtime, load_study, optuna_storage

    state = request.app.state.hub
    record = repo_of(request).get_search(name)
    runtime = Runtime(db_url=settings_of(request).db_url)
    if "optuna" not in state:
        state["optuna"] = optuna_storage(runtime)
    return record, load_study(record, runtime, storage=state["optuna"])


Settings = Annotated[HubSettings, Depends(settings_of)]
Queue = Annotated[JobQueue, Depends(queue_of)]
Repo = Annotated[Repository, Depends(repo_of)]


# Declared through FastAPI's HTTPBearer so that the OpenAPI document names the scheme; the
# checks themselves are ours (auto_error would answer 403 where 401 is right).
_bearer = HTTPBearer(auto_error=False, description="An agent's token, or a reader's for /v1/searches.")


async def _holder_of(request: Request,
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> AgentRecord:
    if credentials is None or not credentials.credentials.strip():
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    token = credentials.credentials.strip()
    queue = queue_of(request)
    found = await run_in_threadpool(queue.authenticate, token)
    if found is None:
        raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return found


async def _current_agent(found: Annotated[AgentRecord, Depends(_holder_of)]) -> AgentRecord:
    """The agent whose bearer token came with the request; 401 otherwise, 403 for a reader."""
    if found.role != Role.AGENT:
        raise HTTPException(403, "a reader token cannot act as an agent")
    return found


async def _current_reader(found: Annotated[AgentRecord, Depends(_holder_of)]) -> AgentRecord:
    """A reader token; agents' tokens measure, they have no business reading searches."""
    if found.role != Role.READER:
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


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]}
            for code in sorted({*codes, 400, 413, 422, 503})}


def one_line(text: str, limit: int = 500) -> str:
    return clean_text(" ".join(str(text).split()), limit)
