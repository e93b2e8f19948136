"""The hub: HTTP API for remote profiler agents, and read endpoints over stored searches.

Every endpoint but ``/v1/health`` needs a bearer token (stored hashed). Agents act only for
themselves: they lease jobs of their own profile, download only artifacts their leased jobs need,
and post results only for jobs they hold. Reader tokens (``hwprune agents add NAME --reader``)
may only read searches. Request bodies are capped before anything else looks at them, and a
result is checked (finite, ordered, the job's own artifact and profile, plausible against the
base model's cached latency) before it reaches the measurement cache. Errors answer
``{"error": <type>, "detail": <message>}``.

The routes live in one module per resource (``agents``, ``jobs``, ``artifacts``, ``searches``);
this module assembles them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from latency_models.wire import API_PREFIX
from search.config import artifacts_url
from search.errors import SearchError, SearchNotFoundError, StorageError
from search.hub import agents, artifacts, jobs, searches
from search.hub.body_cap import BodyCap
from search.hub.deps import HubSettings, one_line
from search.storage import Repository

__all__ = ["HubSettings", "app_from_env", "create_app"]


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
    app.state.settings = settings
    app.add_middleware(BodyCap, limit=settings.max_result_bytes,  # type: ignore[arg-type]
                       batch_limit=settings.max_batch_result_bytes)
    for module in (agents, jobs, artifacts, searches):
        app.include_router(module.router)
    _answer_errors_as_json(app)
    return app


def _answer_errors_as_json(app: FastAPI) -> None:
    """Every refusal answers ``{"error": <type>, "detail": <one line>}`` with its status."""

    # Starlette's own HTTPException (FastAPI's derives from it): FastAPI raises that one for a
    # body it cannot parse, and it must answer in the same shape as ours.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "HTTPException", "detail": one_line(exc.detail)},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]]
        return JSONResponse({"error": "RequestValidationError", "detail": one_line("; ".join(problems))},
                            status_code=422)

    @app.exception_handler(SearchError)
    async def search_error(_request: Request, exc: SearchError) -> JSONResponse:
        status = (404 if isinstance(exc, SearchNotFoundError) else 503 if isinstance(exc, StorageError)
                  else 400)
        return JSONResponse({"error": type(exc).__name__, "detail": one_line(str(exc))}, status_code=status)


DB_ENV = "HWPRUNE_HUB_DB"
LEASE_ENV = "HWPRUNE_HUB_LEASE_S"


def app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes (``hwprune serve --workers N``): each worker builds
    its app from the settings ``hwprune serve`` put in the environment (read here, where the
    hub's settings are made, with the artifact store's)."""
    url = os.environ[DB_ENV]
    return create_app(HubSettings(db_url=url, lease_s=float(os.environ.get(LEASE_ENV, "60")),
                                  artifacts_url=artifacts_url(url)))
