"""The agent's HTTP client for the hub: one method per endpoint, errors mapped to ours."""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from latency_models.errors import LatencyError
from latency_models.store import Outcome
from latency_models.wire import (
    API_PREFIX,
    BatchResultBody,
    FailureBody,
    HeartbeatRequest,
    HeartbeatResponse,
    JobSpec,
    LeaseRequest,
    ResultBody,
    StatusBody,
)

BodyT = TypeVar("BodyT", bound=BaseModel)


class HubUnavailable(LatencyError):
    """The hub could not be reached or answered 5xx: retry later."""


class HubRefused(LatencyError):
    """The hub answered 4xx: the request itself is wrong (bad token, wrong profile)."""

    exit_code = 2

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HubClient:
    """Synchronous client; each call is one request. Not shared between threads."""

    def __init__(self, server: str, token: str, *, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.server = server.rstrip("/")
        try:
            self._client = httpx.Client(
                base_url=self.server + API_PREFIX,
                headers={"Authorization": f"Bearer {token}"},
                timeout=timeout_s,
                transport=transport,
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:
            # Retrying cannot fix a malformed URL or header: refuse at once.
            raise HubRefused(0, f"cannot talk to hub {server!r}: {exc}; check --server and the token") from None

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise HubRefused(0, f"hub URL {self.server!r} is unusable: {exc}; "
                             "give an http:// or https:// URL") from None
        except httpx.TransportError as exc:
            raise HubUnavailable(f"hub {self.server} unreachable: {exc}") from exc
        if response.status_code >= 500:
            raise HubUnavailable(f"hub {self.server} answered {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400 and response.status_code != 409:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise HubRefused(response.status_code,
                             f"hub refused {method} {path} ({response.status_code}): {str(detail)[:500]}")
        return response

    def _parse(self, response: httpx.Response, schema: type[BodyT]) -> BodyT:
        try:
            return schema.model_validate_json(response.content)
        except ValidationError as exc:
            # Whatever answered is not an hwprune hub of this protocol version: waiting won't help.
            raise HubRefused(response.status_code, f"{self.server} answered {response.request.url.path} with "
                             f"something that is not a hwprune hub's {schema.__name__} ({exc.error_count()} "
                             "problems); check --server") from None

    def heartbeat(self, *, job_id: int | None = None, environment: dict[str, str] | None = None,
                  progress: int | None = None) -> bool | None:
        body = HeartbeatRequest(job_id=job_id, environment=environment, progress=progress)
        # Unset fields stay off the wire: a hub that predates a field would refuse it.
        response = self._request("POST", "/agents/heartbeat", json=body.model_dump(exclude_none=True))
        return self._parse(response, HeartbeatResponse).lease_held

    def lease(self, profile: str) -> JobSpec | None:
        response = self._request("POST", "/jobs/lease", json=LeaseRequest(profile=profile).model_dump())
        if response.status_code == 204:
            return None
        return self._parse(response, JobSpec)

    def artifact(self, sha256: str) -> bytes:
        return self._request("GET", f"/artifacts/{sha256}").content

    def post_result(self, job_id: int, result: ResultBody) -> Outcome:
        """Returns ``accepted``, ``duplicate``, ``flagged`` or ``conflict`` (another agent holds the job)."""
        response = self._request("POST", f"/jobs/{job_id}/result", content=result.model_dump_json(),
                                 headers={"Content-Type": "application/json"})
        return Outcome.CONFLICT if response.status_code == 409 else self._parse(response, StatusBody).status

    def post_batch_result(self, job_id: int, result: BatchResultBody) -> Outcome:
        """As ``post_result``, for a batch job."""
        response = self._request("POST", f"/jobs/{job_id}/batch-result", content=result.model_dump_json(),
                                 headers={"Content-Type": "application/json"})
        return Outcome.CONFLICT if response.status_code == 409 else self._parse(response, StatusBody).status

    def post_failure(self, job_id: int, error: str) -> Outcome:
        response = self._request("POST", f"/jobs/{job_id}/failure", json=FailureBody(error=error[:2000]).model_dump())
        return Outcome.CONFLICT if response.status_code == 409 else self._parse(response, StatusBody).status

    def release(self, job_id: int) -> Outcome:
        response = self._request("POST", f"/jobs/{job_id}/release")
        return Outcome.CONFLICT if response.status_code == 409 else self._parse(response, StatusBody).status
