"""Data-governance analyses: one POST route per registered kind (contract/kinds.py: leakage, mislabeled data,
memorization, and an operator's own). Each is a job like an attribution (same lifecycle, progress, cache,
cancel and tenancy), with an answer instead of a score matrix."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from contract.kinds import ANALYSES, AnalysisPublic, AnalysisSpec

from ..auth import Reader, Submitter
from ..deps import IndexesDep, JobsDep, RegistryDep, SettingsDep
from . import jobs as shared
from .attributions import REPORT, SCORES
from .jobs import CREATE, EXPORT, READ, Format, JobId, Table, WaitS, Window

router = APIRouter(prefix="/v1/analyses", tags=["analyses"])
CREATED = {
    "status_code": 202,
    "response_model": AnalysisPublic,
    "responses": {200: {"model": AnalysisPublic, "description": "this tenant asked the same before"}, **CREATE},
}


def _create(spec: AnalysisSpec) -> None:
    """POST /v1/analyses/<kind>: the kind's request body, resolved by its own rules (contract/kinds.py)."""

    async def create(
        body, who: Submitter, jobs: JobsDep, registry: RegistryDep, settings: SettingsDep, indexes: IndexesDep
    ) -> Response:
        return await shared.create(spec.kind, body, who, jobs, registry, settings, indexes)

    create.__annotations__["body"] = spec.create  # the others are this module's names
    name = f"create_{spec.kind}"
    router.add_api_route(
        f"/{spec.kind}",
        create,
        methods=["POST"],
        name=name,
        operation_id=f"{name}_analysis",
        description=spec.describe,
        **CREATED,
    )


for _spec in ANALYSES.values():
    _create(_spec)


@router.get("/{analysis_id}", operation_id="get_analysis", response_model=AnalysisPublic, responses=READ)
async def get_analysis(
    analysis_id: JobId, who: Reader, jobs: JobsDep, settings: SettingsDep, wait_s: WaitS = 0.0
) -> Response:
    """Status, progress and, when finished, the analysis' answer (with `wait_s`: a long poll)."""
    return await shared.view(jobs, settings, analysis_id, who, None, wait_s, "analysis")


@router.get(
    "/{analysis_id}/events", operation_id="follow_analysis", response_class=StreamingResponse, responses=shared.EVENTS
)
async def follow_analysis(analysis_id: JobId, who: Reader, jobs: JobsDep) -> StreamingResponse:
    """The job's status and progress as Server-Sent Events, until it ends: no polling needed."""
    return await shared.events(jobs, analysis_id, who, "analysis")


@router.get("/{analysis_id}/scores", operation_id="get_analysis_scores", responses=SCORES)
async def get_analysis_scores(
    analysis_id: JobId,
    who: Reader,
    jobs: JobsDep,
    request: Request,
    format: Format = None,
    rows: Window = None,
    columns: Window = None,
):
    """The engine's raw float32 score matrix behind the answer (rows: test points, reference group or
    audited records; columns: training records), or a window of it, as for attributions."""
    return await shared.scores(jobs, analysis_id, who, "analysis", request, format, rows, columns)


@router.get("/{analysis_id}/report", operation_id="get_analysis_report", response_class=HTMLResponse, responses=REPORT)
async def get_analysis_report(analysis_id: JobId, who: Reader, jobs: JobsDep, registry: RegistryDep) -> HTMLResponse:
    """A self-contained HTML page of the answer, with thumbnails (or text) of the records involved."""
    return await shared.report(jobs, analysis_id, who, "analysis", registry)


@router.get("/{analysis_id}/export", operation_id="export_analysis", response_class=Response, responses=EXPORT)
async def export_analysis(analysis_id: JobId, who: Reader, jobs: JobsDep, format: Table = "csv") -> Response:
    """The answer as one table (its kind's, contract/tables.py): leakage a row per test point (its best match),
    mislabeled the review list, memorization the audited records: CSV (for a spreadsheet) or JSON Lines."""
    return await shared.export(jobs, analysis_id, who, "analysis", format, None)


@router.delete(
    "/{analysis_id}",
    operation_id="cancel_analysis",
    status_code=202,
    response_model=AnalysisPublic,
    responses={204: {"description": "an ended job's handle (and a result no one else holds) deleted"}, **READ},
)
async def cancel_analysis(analysis_id: JobId, who: Submitter, jobs: JobsDep) -> Response:
    """A queued or running analysis: canceled for this tenant (202); an ended one: deleted (204)."""
    return await shared.cancel(jobs, analysis_id, who, "analysis")
