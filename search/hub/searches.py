"""Hub routes that read stored searches (reader tokens): the same read models, serialised the
same way, as ``hwprune search status/trials --json`` and ``hwprune pareto --json``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request

from latency_models.wire import API_PREFIX
from search.hub.deps import CurrentReader, Repo, SearchName, errors, one_line, study_of

router = APIRouter(prefix=f"{API_PREFIX}/searches")


@router.get("", responses=errors(401, 403))
def searches(me: CurrentReader, repo: Repo) -> list[dict[str, Any]]:
    return [{"name": r.name, "targets": list(r.config.targets), "objective": r.config.objective,
             "created_at": r.created_at.isoformat()} for r in repo.list_searches()]


@router.get("/{name}", responses=errors(401, 403, 404))
def search(name: SearchName, me: CurrentReader, request: Request) -> dict[str, Any]:
    """As ``hwprune search status NAME --json``."""
    from search.study.read import summary

    return summary(*study_of(request, name)).to_dict()


@router.get("/{name}/trials", responses=errors(401, 403, 404))
def trials(name: SearchName, me: CurrentReader, request: Request) -> list[dict[str, Any]]:
    """Every trial, as ``hwprune search trials NAME --json`` lists them."""
    from search.study.read import trial_rows

    return [row.to_dict() for row in trial_rows(*study_of(request, name))]


@router.get("/{name}/pareto", responses=errors(400, 401, 403, 404))
def pareto(name: SearchName, me: CurrentReader, request: Request,
           target: Annotated[str | None, Query(max_length=100)] = None) -> list[dict[str, Any]]:
    """As ``hwprune pareto NAME --json``."""
    from search.study.read import check_target, pareto_rows

    record, found = study_of(request, name)
    chosen = target or record.config.targets[0]
    if chosen not in record.config.targets:
        # a well-formed name of no target of this search: no such front (404), not bad input
        raise HTTPException(404, f"target {one_line(chosen, 100)!r} is not one of this search's: "
                                 f"{', '.join(record.config.targets)}")
    return [row.to_dict() for row in pareto_rows(record, found, check_target(record, chosen))]
