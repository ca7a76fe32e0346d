"""Data-governance analyses: leakage, mislabeled data, memorization. Each is a job like an attribution
(same lifecycle, progress, cache and cancel), with an answer instead of a score matrix."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from contract.schemas import AnalysisPublic, LeakageCreate, MemorizationCreate, MislabeledCreate

from ..deps import JobsDep, RegistryDep, SettingsDep
from .attributions import PROBLEMS, REPORT, SCORES, Format, WaitS, create, report_response, scores_response

router = APIRouter(prefix="/v1/analyses", tags=["analyses"])
CREATED = {200: {"model": AnalysisPublic}, 202: {"model": AnalysisPublic}, **PROBLEMS}


@router.post("/leakage", operation_id="create_leakage_analysis", status_code=202, responses=CREATED)
def create_leakage(body: LeakageCreate, jobs: JobsDep, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Which test points are present in the training set: per test point the closest training record,
    a calibrated leaked/not decision (threshold and calibration reported) and the 5 closest as evidence."""
    return create("leakage", body, jobs, registry, settings)


@router.post("/mislabeled", operation_id="create_mislabeled_analysis", status_code=202, responses=CREATED)
def create_mislabeled(body: MislabeledCreate, jobs: JobsDep, registry: RegistryDep, settings: SettingsDep) -> Response:
    """Training records ranked by how likely their label is wrong, a review list with its expected
    precision, and per-class summaries."""
    return create("mislabeled", body, jobs, registry, settings)


@router.post("/memorization", operation_id="create_memorization_analysis", status_code=202, responses=CREATED)
def create_memorization(
    body: MemorizationCreate, jobs: JobsDep, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """For each requested training record: how much the model relies on it (and its exact copies) for
    its own prediction versus its supporting neighbours; ranked, with outliers flagged."""
    return create("memorization", body, jobs, registry, settings)


@router.get("/{analysis_id}", operation_id="get_analysis", response_model=AnalysisPublic, responses=PROBLEMS)
async def get_analysis(analysis_id: str, jobs: JobsDep, settings: SettingsDep, wait_s: WaitS = 0.0) -> Response:
    """Status, progress and, when finished, the analysis' answer (with `wait_s`: a long poll)."""
    body = await jobs.wait(analysis_id, None, min(wait_s, settings.max_wait_s), analysis=True)
    return Response(body, media_type="application/json")


@router.get("/{analysis_id}/scores", operation_id="get_analysis_scores", responses=SCORES)
def get_analysis_scores(analysis_id: str, jobs: JobsDep, request: Request, format: Format = None) -> Response:
    """The engine's raw float32 score matrix behind the answer (rows: test points, reference group or
    audited records; columns: training records)."""
    return scores_response(jobs, analysis_id, True, request, format)


@router.get("/{analysis_id}/report", operation_id="get_analysis_report", response_class=HTMLResponse, responses=REPORT)
def get_analysis_report(analysis_id: str, jobs: JobsDep, registry: RegistryDep) -> HTMLResponse:
    """A self-contained HTML page of the answer, with thumbnails (or text) of the records involved."""
    return report_response(jobs, analysis_id, True, registry)


@router.delete("/{analysis_id}", operation_id="cancel_analysis", status_code=202, responses=PROBLEMS)
def cancel_analysis(analysis_id: str, jobs: JobsDep) -> AnalysisPublic:
    """Cancel: a queued job is removed; a running one stops at its next batch."""
    return jobs.cancel(analysis_id, analysis=True)
