"""What attributions and analyses share: the documented problems of each operation, the handlers behind
create / view / scores / report / cancel, and a tenant's job list (GET /v1/jobs)."""

from __future__ import annotations

import io
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from contract.schemas import JobPage, Problem

from .. import metrics
from ..auth import Principal, Reader
from ..deps import JobsDep
from ..jobs import Jobs, links
from ..report import render
from ..resolve import Request as JobRequest
from ..resolve import resolve


def problems(*codes: int) -> dict:
    """OpenAPI entries for the problem+json answers an operation can give (401/403 on every /v1 one)."""
    return {c: {"model": Problem, "content": {"application/problem+json": {}}} for c in sorted({*codes, 401, 403})}


READ = problems(404, 422, 503)
RESULT = problems(404, 409, 422, 503)
CREATE = problems(400, 404, 413, 422, 429, 503)
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="a job id, as its POST returned it")]
TopK = Annotated[int | None, Query(ge=1, le=1000, description="default: the creating request's")]
WaitS = Annotated[float, Query(ge=0, le=3600, description="wait up to this long (capped by ATTR_MAX_WAIT_S)")]
Format = Annotated[str | None, Query(pattern="^(json|npy)$")]


async def create(kind: str, body: JobRequest, who: Principal, jobs: Jobs, registry, settings) -> Response:
    """Resolve (422 when it cannot run), then enqueue or join (202 + Location) or answer from the cache."""
    job = resolve(kind, body, registry, settings)
    public, status, handle = await jobs.submit(job, who, getattr(body, "top_k", None))
    metrics.CACHE.labels("hit" if status == 200 else "miss").inc()
    headers = {} if status == 200 else {"Location": links(kind, handle)["self"]}
    return Response(public, status_code=status, headers=headers, media_type="application/json")


async def view(jobs: Jobs, settings, handle: str, who: Principal, top_k, wait_s: float, analysis: bool) -> Response:
    body = await jobs.wait(handle, who, top_k, min(wait_s, settings.max_wait_s), analysis)
    return Response(body, media_type="application/json")


async def scores(jobs: Jobs, handle: str, who: Principal, analysis: bool, request: Request, format) -> Response:
    result, raw = await jobs.finished(handle, who, analysis)
    matrix = np.frombuffer(raw, dtype="<f4").reshape(result["shape"])
    if format == "npy" or (format is None and "application/x-npy" in request.headers.get("accept", "")):
        buf = io.BytesIO()
        np.save(buf, matrix, allow_pickle=False)
        return Response(buf.getvalue(), media_type="application/x-npy")
    return JSONResponse(
        await run_in_threadpool(lambda: {"id": handle, "shape": list(matrix.shape), "scores": matrix.tolist()})
    )


async def report(jobs: Jobs, handle: str, who: Principal, analysis: bool, registry) -> HTMLResponse:
    result, raw = await jobs.finished(handle, who, analysis)
    matrix = np.frombuffer(raw, dtype="<f4").reshape(result["shape"])
    return HTMLResponse(await run_in_threadpool(render, handle, result, matrix, registry))


async def cancel(jobs: Jobs, handle: str, who: Principal, analysis: bool) -> Response:
    public = await jobs.cancel(handle, who, analysis)
    return Response(status_code=204) if public is None else JSONResponse(public, status_code=202)


router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", operation_id="list_jobs", response_model=JobPage, responses=problems(422, 503))
async def list_jobs(
    who: Reader,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    before: Annotated[float | None, Query(description="the `next` of the previous page")] = None,
    kind: Literal["attribution", "leakage", "mislabeled", "memorization"] | None = None,
    status: Literal["queued", "running", "finished", "failed", "canceled"] | None = None,
) -> dict:
    """This tenant's attributions and analyses, newest first, optionally of one kind or status."""
    return await jobs.page(who, limit, before, kind, status)
