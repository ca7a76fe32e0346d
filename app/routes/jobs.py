"""What attributions and analyses share: the documented problems of each operation, the handlers behind
create / view / scores / report / cancel, and a tenant's job list (GET /v1/jobs)."""

from __future__ import annotations

import io
import math
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from contract import tables
from contract.jobs import InlinePoints, LeakageJob
from contract.kinds import Job, JobPage, Kind, table
from contract.method import Family
from contract.problems import Conflict, InvalidInput
from contract.schemas import JobCreate, Problem, Status

from .. import metrics
from ..auth import Principal, Reader
from ..deps import JobsDep
from ..indexes import Indexes
from ..jobs import Jobs, links
from ..report import CSP, ROWS, SAMPLE, render
from ..resolve import resolve
from ..webhooks import check


def problems(*codes: int) -> dict:
    """OpenAPI entries for the problem+json answers an operation can give (401/403 on every /v1 one)."""
    return {c: {"model": Problem, "content": {"application/problem+json": {}}} for c in sorted({*codes, 401, 403})}


READ = problems(404, 422, 503)
RESULT = problems(404, 409, 422, 503)
CREATE = problems(400, 404, 413, 415, 422, 429, 503)
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="a job id, as its POST returned it")]
TopK = Annotated[int | None, Query(ge=1, le=1000, description="default: the creating request's")]
WaitS = Annotated[float, Query(ge=0, le=3600, description="wait up to this long (capped by ATTR_MAX_WAIT_S)")]
Format = Annotated[str | None, Query(pattern="^(json|npy)$")]
Table = Annotated[str, Query(pattern=f"^({'|'.join(tables.FORMATS)})$", description="CSV or JSON Lines")]
EXPORT = {200: {"content": {media: {"schema": {"type": "string"}} for media in tables.FORMATS.values()}}, **RESULT}
Window = Annotated[
    str | None,
    Query(pattern=r"^\d{0,12}:\d{0,12}$", description="a:b, the half-open range [a, b); a or b may be left out"),
]


async def create(
    kind: str, body: JobCreate, who: Principal, jobs: Jobs, registry, settings, indexes: Indexes | None = None
) -> Response:
    """Resolve (422 when it cannot run), then enqueue or join (202 + Location) or answer from the cache.
    `indexes`: where an attribution may find the index of its model and dataset (two-stage)."""
    index = None
    model, dataset = registry.model(body.model), registry.dataset(body.dataset)
    if indexes is not None and model is not None and dataset is not None:
        index = await indexes.find(model.digest, dataset.digest)
    job = resolve(kind, body, registry, settings, index)
    if body.webhook is not None:
        check(body.webhook, settings)
    parts = _parts(job, registry, settings)  # one job, or a fan-out over parts
    records = registry.dataset(job.dataset.id).size
    public, status, handle = await jobs.submit(job, who, getattr(body, "top_k", None), parts, records)
    if body.webhook is not None:
        await jobs.webhooks.register(handle, job.key, body.webhook)
    metrics.CACHE.labels("hit" if status == 200 else "miss").inc()
    headers = {} if status == 200 else {"Location": links(kind, handle)["self"]}
    return Response(public, status_code=status, headers=headers, media_type="application/json")


def _parts(job: Job, registry, settings) -> list[tuple[int, int]]:
    """What a computation fans out over: groups of the training set's shards; for a leakage analysis through
    an index, groups of its test points, then its calibration records (at most so many)."""
    if isinstance(job, LeakageJob) and job.index:
        n = len(job.points.inputs if isinstance(job.points, InlinePoints) else job.points.indices)
        step = settings.leakage_part_rows
        return [(lo, min(n, lo + step)) for lo in range(0, n, step)] + [(n, n + job.calibration_records)]
    return registry.dataset(job.dataset.id).parts(settings.part_records)


async def view(jobs: Jobs, settings, handle: str, who: Principal, top_k, wait_s: float, family: Family) -> Response:
    body = await jobs.wait(handle, who, top_k, min(wait_s, settings.max_wait_s), family)
    return Response(body, media_type="application/json")


EVENTS = {
    200: {
        "description": "Server-Sent Events: `progress` each time the job's view changes, then one `end` (its final "
        "view: finished, failed or canceled); comment lines keep an idle stream open",
        "content": {
            "text/event-stream": {
                "schema": {  # one event (OpenAPI 3.2 calls this itemSchema)
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["progress", "end"]},
                        "id": {"type": "string", "description": "the event's number in this stream"},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "description": "the job's view as JSON, as GET returns it",
                        },
                    },
                }
            }
        },
    },
    **READ,
}


async def events(jobs: Jobs, handle: str, who: Principal, family: Family) -> StreamingResponse:
    """The job's events until it ends (404 at once for an unknown id, before the stream starts)."""
    stream = jobs.follow(handle, who, family, every=jobs.settings.events_interval_s)
    first = await anext(stream)  # raises NotFound here, as a problem+json answer

    async def sse():
        try:
            event, body, number = *first, 1
            while True:
                yield _frame(number, event, body)
                event, body = await anext(stream)
                number += 1
        except StopAsyncIteration:
            return
        finally:
            await stream.aclose()  # leaves the job's watch at once when the client goes away

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
    return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)


def _frame(number: int, event: str, body: bytes) -> bytes:
    """One Server-Sent Event (a comment line for a keepalive)."""
    if event == "keepalive":
        return b": keepalive\n\n"
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (number, event.encode(), body)


async def scores(
    jobs: Jobs,
    handle: str,
    who: Principal,
    family: Family,
    request: Request,
    format,
    rows: str | None,
    columns: str | None,
) -> Response:
    """A window of the score matrix (default: all of it): .npy streamed row by row, or JSON in pages of at
    most ATTR_SCORES_PAGE_VALUES scores, each with the `next` page's URL."""
    result, store, _ = await jobs.finished(handle, who, family)
    if not store.columns:
        raise Conflict(f"{handle!r} was answered through an index: it keeps no score matrix (candidates only)")
    r0, r1 = _window(rows, store.rows, "rows")
    c0, c1 = _window(columns, store.columns, "columns")
    if format == "npy" or (format is None and "application/x-npy" in request.headers.get("accept", "")):
        return StreamingResponse(
            _npy(store, r0, r1, c0, c1, jobs.settings.scores_page_values), media_type="application/x-npy"
        )
    width = max(1, jobs.settings.scores_page_values // (r1 - r0))
    end = min(c1, c0 + width)
    matrix = await store.window(r0, r1, c0, end)
    page = {"id": handle, "shape": [store.rows, store.columns], "rows": [r0, r1], "columns": [c0, end]}
    if store.records is not None:
        page["records"] = store.records[c0:end]
    page["next"] = str(request.url.include_query_params(columns=f"{end}:{c1}", rows=f"{r0}:{r1}")) if end < c1 else None
    return JSONResponse(await run_in_threadpool(lambda: {**page, "scores": matrix.tolist()}))


def _window(text: str | None, size: int, what: str) -> tuple[int, int]:
    lo, _, hi = (text or ":").partition(":")
    lo, hi = int(lo or 0), min(size, int(hi) if hi else size)
    if not lo < hi:
        raise InvalidInput(f"{what}={text!r}: an empty window of {size} {what}", [{"loc": ["query", what]}])
    return lo, hi


async def _npy(store, r0: int, r1: int, c0: int, c1: int, chunk: int):
    """A .npy file of the window, one row (in column chunks) at a time."""
    header = np.lib.format.header_data_from_array_1_0(np.empty((0, 0), "<f4"))
    header["shape"] = (r1 - r0, c1 - c0)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    yield buf.getvalue()
    for r in range(r0, r1):
        for lo in range(c0, c1, chunk):
            yield (await store.window(r, r + 1, lo, min(c1, lo + chunk))).tobytes()


async def report(jobs: Jobs, handle: str, who: Principal, family: Family, registry) -> HTMLResponse:
    result, store, top_k = await jobs.finished(handle, who, family)
    step = max(1, math.ceil(store.columns / SAMPLE))  # histograms of every step-th record's score
    sample = await store.window(0, min(store.rows, ROWS), 0, store.columns, step)
    page = await run_in_threadpool(render, handle, result, sample, step, registry, top_k)
    return HTMLResponse(page, headers={"Content-Security-Policy": CSP})


async def export(jobs: Jobs, handle: str, who: Principal, family: Family, format: str, top_k: int | None) -> Response:
    view = await jobs.view(handle, who, top_k, family)
    if view.status != "finished":
        raise Conflict(f"{handle!r} is {view.status}: no result")
    kind = getattr(view, "kind", "attribution")
    text = await run_in_threadpool(lambda: tables.export(table(kind), view.result.model_dump(mode="json"), format))
    disposition = f'attachment; filename="{kind}-{handle}.{format}"'
    return Response(text, media_type=tables.FORMATS[format], headers={"content-disposition": disposition})


async def cancel(jobs: Jobs, handle: str, who: Principal, family: Family) -> Response:
    public = await jobs.cancel(handle, who, family)
    if public is None:
        return Response(status_code=204)
    return Response(public.model_dump_json(), status_code=202, media_type="application/json")


router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("", operation_id="list_jobs", response_model=JobPage, responses=problems(422, 503))
async def list_jobs(
    who: Reader,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    before: Annotated[float | None, Query(description="the `next` of the previous page")] = None,
    kind: Kind | None = None,
    status: Status | None = None,
) -> dict:
    """This tenant's attributions and analyses, newest first, optionally of one kind or status."""
    return await jobs.page(who, limit, before, kind, status)
