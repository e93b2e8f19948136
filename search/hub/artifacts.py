"""Hub route of artifacts: an agent downloads the ONNX files of the jobs it holds, and no other."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response

from latency_models.wire import API_PREFIX
from search.hub.deps import CurrentAgent, Queue, Repo, Sha256Path, errors

router = APIRouter(prefix=API_PREFIX)


@router.get("/artifacts/{sha256}", response_class=Response,
            responses={200: {"description": "The ONNX bytes.",
                             "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}},
                       **errors(401, 403, 404)})
def artifact(sha256: Sha256Path, me: CurrentAgent, queue: Queue, repo: Repo) -> Response:
    if not queue.holds_artifact(me, sha256):
        raise HTTPException(403, "no job leased by this agent needs that artifact")
    content = repo.get_artifact(sha256)  # from the artifact store, checked against its name
    if content is None:
        raise HTTPException(404, f"no artifact {sha256}")
    return Response(content, media_type="application/octet-stream")
