"""Attribution jobs: create (202, or 200 from the score cache), status and result, scores, report, cancel.

The analyses (routes/analyses.py) are the same jobs with another result; the helpers here serve both.
"""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from contract.registry import Registry
from contract.schemas import AttributionCreate, AttributionPublic, Problem
from contract.settings import Settings

from .. import metrics
from ..deps import JobsDep, RegistryDep, SettingsDep
from ..jobs import Jobs
from ..report import render
from ..resolve import Request as JobRequest
from ..resolve import resolve

router = APIRouter(prefix="/v1/attributions", tags=["attributions"])
PROBLEMS = {code: {"model": Problem, "content": {"application/problem+json": {}}} for code in (404, 409, 413, 422, 503)}
SCORES = {200: {"content": {"application/json": {}, "application/x-npy": {}}}, **PROBLEMS}
REPORT = {200: {"content": {"text/html": {}}}, **PROBLEMS}
TopK = Annotated[int | None, Query(ge=1, le=1000, description="default: the creating request's")]
WaitS = Annotated[float, Query(ge=0, description="wait up to this long (capped) for the job to end")]
Format = Annotated[str | None, Query(pattern="^(json|npy)$")]


def create(kind: str, body: JobRequest, jobs: Jobs, registry: Registry, settings: Settings) -> Response:
    """Validate, then enqueue (202 + Location), join an identical job, or answer from the cache (200)."""
    public, cached = jobs.submit(resolve(kind, body, registry, settings), getattr(body, "top_k", None))
    metrics.CACHE.labels("hit" if cached else "miss").inc()
    headers = {} if cached else {"Location": public["links"]["self"]}
    return JSONResponse(public, status_code=200 if cached else 202, headers=headers)


def scores_response(jobs: Jobs, key: str, analysis: bool, request: Request, format: str | None) -> Response:
    result, raw = jobs.finished(key, analysis)
    scores = np.frombuffer(raw, dtype="<f4").reshape(result["shape"])
    if format == "npy" or (format is None and "application/x-npy" in request.headers.get("accept", "")):
        buf = io.BytesIO()
        np.save(buf, scores, allow_pickle=False)
        return Response(buf.getvalue(), media_type="application/x-npy")
    return JSONResponse({"id": key, "shape": list(scores.shape), "scores": scores.tolist()})


def report_response(jobs: Jobs, key: str, analysis: bool, registry: Registry) -> HTMLResponse:
    result, raw = jobs.finished(key, analysis)
    return HTMLResponse(render(key, result, np.frombuffer(raw, dtype="<f4").reshape(result["shape"]), registry))


@router.post(
    "", operation_id="create_attribution", status_code=202, responses={200: {"model": AttributionPublic}, **PROBLEMS}
)
def create_attribution(
    body: AttributionCreate, jobs: JobsDep, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Score the training set for the test points. 202 with a status URL; 200 with the result at once
    when the same request was answered before; an identical queued or running request is joined."""
    return create("attribution", body, jobs, registry, settings)


@router.get("/{attribution_id}", operation_id="get_attribution", response_model=AttributionPublic, responses=PROBLEMS)
async def get_attribution(
    attribution_id: str, jobs: JobsDep, settings: SettingsDep, top_k: TopK = None, wait_s: WaitS = 0.0
) -> Response:
    """Status, progress, timing and, when finished, the top-k proponents and opponents per test point.
    With `wait_s`, a long poll: the answer comes when the job ends or the wait is over."""
    body = await jobs.wait(attribution_id, top_k, min(wait_s, settings.max_wait_s))
    return Response(body, media_type="application/json")


@router.get("/{attribution_id}/scores", operation_id="get_attribution_scores", responses=SCORES)
def get_scores(attribution_id: str, jobs: JobsDep, request: Request, format: Format = None) -> Response:
    """The full (n_test, n_train) float32 score matrix: JSON, or .npy with `Accept: application/x-npy`."""
    return scores_response(jobs, attribution_id, False, request, format)


@router.get(
    "/{attribution_id}/report", operation_id="get_attribution_report", response_class=HTMLResponse, responses=REPORT
)
def get_report(attribution_id: str, jobs: JobsDep, registry: RegistryDep) -> HTMLResponse:
    """A self-contained HTML page: each test point, its top proponents and opponents (images as PNG
    thumbnails, token data as text) with scores and record ids, and a histogram of its scores."""
    return report_response(jobs, attribution_id, False, registry)


@router.delete("/{attribution_id}", operation_id="cancel_attribution", status_code=202, responses=PROBLEMS)
def cancel_attribution(attribution_id: str, jobs: JobsDep) -> AttributionPublic:
    """Cancel: a queued job is removed; a running one stops at its next batch."""
    return jobs.cancel(attribution_id)
