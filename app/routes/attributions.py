"""Attribution jobs: create (202, or 200 from the tenant's cache), status and result, scores, report, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from contract.schemas import AttributionCreate, AttributionPublic, ScoresPage

from ..auth import Reader, Submitter
from ..deps import IndexesDep, JobsDep, RegistryDep, SettingsDep
from . import jobs as shared
from .jobs import CREATE, EXPORT, READ, RESULT, Format, JobId, Table, TopK, WaitS, Window

router = APIRouter(prefix="/v1/attributions", tags=["attributions"])
SCORES = {
    200: {
        "model": ScoresPage,
        "content": {"application/json": {}, "application/x-npy": {"schema": {"type": "string", "format": "binary"}}},
    },
    **RESULT,
}
REPORT = {200: {"content": {"text/html": {}}}, **RESULT}
CREATED = {200: {"model": AttributionPublic, "description": "this tenant asked the same before: the result"}}


@router.post(
    "",
    operation_id="create_attribution",
    status_code=202,
    response_model=AttributionPublic,
    responses={**CREATED, **CREATE},
)
async def create_attribution(
    body: AttributionCreate,
    who: Submitter,
    jobs: JobsDep,
    registry: RegistryDep,
    settings: SettingsDep,
    indexes: IndexesDep,
) -> Response:
    """Score the training set for the test points. 202 with a status URL (the job may already be finished);
    200 with the result when this tenant made the same request before; an identical queued or running
    request is joined. Where the model and dataset have an index (POST /v1/indexes), only its candidates are
    re-scored (`candidates`)."""
    return await shared.create("attribution", body, who, jobs, registry, settings, indexes)


@router.get("/{attribution_id}", operation_id="get_attribution", response_model=AttributionPublic, responses=READ)
async def get_attribution(
    attribution_id: JobId, who: Reader, jobs: JobsDep, settings: SettingsDep, top_k: TopK = None, wait_s: WaitS = 0.0
) -> Response:
    """Status, progress, timing and, when finished, the top-k proponents and opponents per test point.
    With `wait_s`, a long poll: the answer comes when the job ends or the wait is over."""
    return await shared.view(jobs, settings, attribution_id, who, top_k, wait_s, "attribution")


@router.get(
    "/{attribution_id}/events",
    operation_id="follow_attribution",
    response_class=StreamingResponse,
    responses=shared.EVENTS,
)
async def follow_attribution(attribution_id: JobId, who: Reader, jobs: JobsDep) -> StreamingResponse:
    """The job's status and progress as Server-Sent Events, until it ends: no polling needed."""
    return await shared.events(jobs, attribution_id, who, "attribution")


@router.get("/{attribution_id}/scores", operation_id="get_attribution_scores", responses=SCORES)
async def get_scores(
    attribution_id: JobId,
    who: Reader,
    jobs: JobsDep,
    request: Request,
    format: Format = None,
    rows: Window = None,
    columns: Window = None,
):
    """The (n_test, n_train) float32 score matrix, or a window of it (`rows`, `columns`): .npy with
    `Accept: application/x-npy` (streamed), else JSON in pages (`next`)."""
    return await shared.scores(jobs, attribution_id, who, "attribution", request, format, rows, columns)


@router.get(
    "/{attribution_id}/report", operation_id="get_attribution_report", response_class=HTMLResponse, responses=REPORT
)
async def get_report(attribution_id: JobId, who: Reader, jobs: JobsDep, registry: RegistryDep) -> HTMLResponse:
    """A self-contained HTML page: each test point, its top proponents and opponents (images as PNG
    thumbnails, token data as text) with scores and record ids, and a histogram of its scores."""
    return await shared.report(jobs, attribution_id, who, "attribution", registry)


@router.get("/{attribution_id}/export", operation_id="export_attribution", response_class=Response, responses=EXPORT)
async def export_attribution(
    attribution_id: JobId, who: Reader, jobs: JobsDep, format: Table = "csv", top_k: TopK = None
) -> Response:
    """The result as one table (contract/tables.py): a row per proponent and opponent of each test point,
    with the test point's label and prediction: CSV (for a spreadsheet) or JSON Lines."""
    return await shared.export(jobs, attribution_id, who, "attribution", format, top_k)


@router.delete(
    "/{attribution_id}",
    operation_id="cancel_attribution",
    status_code=202,
    response_model=AttributionPublic,
    responses={204: {"description": "an ended job's handle (and a result no one else holds) deleted"}, **READ},
)
async def cancel_attribution(attribution_id: JobId, who: Submitter, jobs: JobsDep) -> Response:
    """A queued or running job: canceled for this tenant (202); it stops when no other tenant wants it.
    An ended one: deleted (204), with its result and scores unless another tenant holds them."""
    return await shared.cancel(jobs, attribution_id, who, "attribution")
