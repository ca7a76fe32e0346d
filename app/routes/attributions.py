"""Attribution jobs: create (202, or 200 from the score cache), status and result, scores, cancel."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from .. import metrics
from ..deps import JobsDep, RegistryDep, SettingsDep
from ..inputs import resolve
from ..schemas import AttributionCreate, AttributionPublic, Problem

router = APIRouter(prefix="/v1/attributions", tags=["attributions"])
PROBLEMS = {code: {"model": Problem, "content": {"application/problem+json": {}}} for code in (404, 409, 413, 422, 503)}


@router.post(
    "", operation_id="create_attribution", status_code=202, responses={200: {"model": AttributionPublic}, **PROBLEMS}
)
def create_attribution(
    body: AttributionCreate, jobs: JobsDep, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Score the training set for the test points. 202 with a status URL; 200 with the result at once
    when the same request was answered before; an identical queued or running request is joined."""
    model, dataset = resolve(body, registry, settings)
    public, cached = jobs.submit(body, model, dataset)
    metrics.CACHE.labels("hit" if cached else "miss").inc()
    headers = {} if cached else {"Location": public.links["self"]}
    return JSONResponse(public.model_dump(mode="json"), status_code=200 if cached else 202, headers=headers)


@router.get("/{attribution_id}", operation_id="get_attribution", responses=PROBLEMS)
def get_attribution(
    attribution_id: str,
    jobs: JobsDep,
    settings: SettingsDep,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="default: the creating request's")] = None,
    wait_s: Annotated[float, Query(ge=0, description="wait up to this long (capped) for the job to end")] = 0.0,
) -> AttributionPublic:
    """Status, progress, timing and, when finished, the top-k proponents and opponents per test point.
    With `wait_s`, a long poll: the answer comes when the job ends or the wait is over."""
    return jobs.get(attribution_id, top_k, min(wait_s, settings.max_wait_s))


@router.get(
    "/{attribution_id}/scores",
    operation_id="get_attribution_scores",
    responses={200: {"content": {"application/json": {}, "application/x-npy": {}}}, **PROBLEMS},
)
def get_scores(
    attribution_id: str,
    jobs: JobsDep,
    request: Request,
    format: Annotated[str | None, Query(pattern="^(json|npy)$")] = None,
) -> Response:
    """The full (n_test, n_train) float32 score matrix: JSON, or .npy with `Accept: application/x-npy`."""
    shape, raw = jobs.scores(attribution_id)
    scores = np.frombuffer(raw, dtype="<f4").reshape(shape)
    if format == "npy" or (format is None and "application/x-npy" in request.headers.get("accept", "")):
        buf = io.BytesIO()
        np.save(buf, scores, allow_pickle=False)
        return Response(buf.getvalue(), media_type="application/x-npy")
    return JSONResponse({"id": attribution_id, "shape": list(shape), "scores": scores.tolist()})


@router.delete("/{attribution_id}", operation_id="cancel_attribution", status_code=202, responses=PROBLEMS)
def cancel_attribution(attribution_id: str, jobs: JobsDep) -> AttributionPublic:
    """Cancel: a queued job is removed; a running one stops at its next batch."""
    return jobs.cancel(attribution_id)
