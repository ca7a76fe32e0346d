"""Registered models and datasets, as read (registration: app/routes/admin.py, or the operator on disk)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from contract.problems import NotFound
from contract.registry import ID
from contract.schemas import DatasetPublic, ModelPublic

from ..auth import Reader
from ..deps import RegistryDep
from .jobs import READ, problems

EntryId = Annotated[str, Path(pattern=ID, description="a registered id")]

router = APIRouter(prefix="/v1", tags=["registry"])


def _model(m) -> ModelPublic:
    return ModelPublic(
        id=m.id,
        version=m.version,
        description=m.description,
        task=m.task,
        architecture=m.architecture,
        input=m.input.model_dump(exclude_none=True),
        method_defaults=m.method.model_dump(exclude_none=True),
        digest=m.digest,
    )


def _dataset(d) -> DatasetPublic:
    return DatasetPublic(
        id=d.id,
        version=d.version,
        description=d.description,
        size=d.size,
        shards=len(d.shards),
        input=d.input.model_dump(exclude_none=True),
        trained=d.trained,
        digest=d.digest,
    )


@router.get("/models", operation_id="list_models", responses=problems(503))
def list_models(who: Reader, registry: RegistryDep) -> list[ModelPublic]:
    return [_model(m) for m in registry.models()]


@router.get("/models/{model_id}", operation_id="get_model", responses=READ)
def get_model(model_id: EntryId, who: Reader, registry: RegistryDep) -> ModelPublic:
    if (m := registry.model(model_id)) is None:
        raise NotFound(f"unknown model {model_id!r}")
    return _model(m)


@router.get("/datasets", operation_id="list_datasets", responses=problems(503))
def list_datasets(who: Reader, registry: RegistryDep) -> list[DatasetPublic]:
    return [_dataset(d) for d in registry.datasets()]


@router.get("/datasets/{dataset_id}", operation_id="get_dataset", responses=READ)
def get_dataset(dataset_id: EntryId, who: Reader, registry: RegistryDep) -> DatasetPublic:
    if (d := registry.dataset(dataset_id)) is None:
        raise NotFound(f"unknown dataset {dataset_id!r}")
    return _dataset(d)
