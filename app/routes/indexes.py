"""Training-side indexes (two-stage attribution): build (admin), list, show, delete (admin).

POST   /v1/indexes          IndexCreate -> IndexPublic (202: building; 200: built before)
GET    /v1/indexes          IndexPage
GET    /v1/indexes/{id}     IndexPublic: status and progress, then what it holds (size, bytes per
                            record, build time, settings, recall)
DELETE /v1/indexes/{id}     stops a build; forgets the index and frees its files (204)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from fastapi.responses import JSONResponse

from contract.schemas import IndexCreate, IndexPage, IndexPublic

from ..auth import Principal, Reader, require
from ..deps import IndexesDep, RegistryDep, SettingsDep
from ..resolve import resolve_index
from .jobs import CREATE, READ, problems

Admin = Annotated[Principal, require("admin")]
IndexId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="an index id, as its POST returned it")]

router = APIRouter(prefix="/v1/indexes", tags=["indexes"])


@router.post(
    "",
    operation_id="create_index",
    status_code=202,
    response_model=IndexPublic,
    responses={200: {"model": IndexPublic, "description": "built before: the index"}, **CREATE},
)
async def create_index(
    body: IndexCreate, who: Admin, indexes: IndexesDep, registry: RegistryDep, settings: SettingsDep
) -> Response:
    """Build the index of a model and its training set on the workers (one job per part of the training set,
    with progress); an identical build is joined, a finished one returned. Requests on that model and
    dataset version then re-score only the index's candidates (AttributionCreate.candidates)."""
    job = resolve_index(body, registry, settings, await indexes.entries())
    parts = registry.dataset(job.dataset.id).parts(settings.part_records)
    view, status = await indexes.create(job, who, parts)
    headers = {} if status == 200 else {"Location": view["links"]["self"]}
    return JSONResponse(view, status_code=status, headers=headers)


@router.get("", operation_id="list_indexes", response_model=IndexPage, responses=problems(503))
async def list_indexes(who: Reader, indexes: IndexesDep) -> dict:
    """Every index, built or building."""
    return await indexes.page()


@router.get("/{index_id}", operation_id="get_index", response_model=IndexPublic, responses=READ)
async def get_index(index_id: IndexId, who: Reader, indexes: IndexesDep) -> dict:
    """Status and progress while it builds; then what it holds: records, bytes per record, build time,
    settings, the parameters it sketches and its measured recall."""
    return await indexes.view(index_id)


@router.delete("/{index_id}", operation_id="delete_index", status_code=204, responses=READ)
async def delete_index(index_id: IndexId, who: Admin, indexes: IndexesDep) -> Response:
    """Stop its build and forget it (requests on its model and dataset sweep in full again); the workers' maintenance
    then frees its files."""
    await indexes.delete(index_id)
    return Response(status_code=204)
