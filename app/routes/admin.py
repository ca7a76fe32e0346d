"""Registration over HTTP (admin scope): upload a model's or dataset's files one by one, then register the
entry, which a worker loads and steps once first (a dry run reports without registering). Replacing an
entry gives it a new digest, so no result of the old one is served for new requests; deleting it refuses
new requests for it.

    PUT    /v1/admin/{models|datasets}/{id}/files/{name}    raw bytes (safetensors, json, jsonl, npy, txt)
    POST   /v1/admin/models/{id}                             ModelRegistration -> ModelRegistered
    POST   /v1/admin/datasets/{id}                           DatasetRegistration -> DatasetRegistered
    DELETE /v1/admin/{models|datasets}/{id}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from contract.problems import InvalidInput, NotFound, PayloadTooLarge
from contract.registry import FILE, ID, TOKENIZER_FILES, RegistryError
from contract.schemas import (
    DatasetRegistered,
    DatasetRegistration,
    IndexCreate,
    ModelRegistered,
    ModelRegistration,
    Probe,
    UploadedFile,
)

from ..auth import Principal, require
from ..deps import IndexesDep, JobsDep, RegistryDep, SettingsDep
from ..resolve import resolve_index
from .jobs import problems
from .models import _dataset, _model

Admin = Annotated[Principal, require("admin")]
EntryId = Annotated[str, Path(pattern=ID, description="the entry's id")]
Kind = Literal["models", "datasets"]

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _refused(exc: RegistryError) -> InvalidInput:
    return InvalidInput(str(exc))


@router.put(
    "/{kind}/{entry_id}/files/{name}", status_code=201, operation_id="upload_file", responses=problems(413, 422)
)
async def upload_file(
    kind: Kind,
    entry_id: EntryId,
    name: Annotated[str, Path(pattern=FILE)],
    request: Request,
    who: Admin,
    registry: RegistryDep,
    settings: SettingsDep,
) -> UploadedFile:
    """Stage one file of an entry being registered (the request body is the file's bytes). Staged entries left
    unregistered for ATTR_STAGING_TTL_S are removed."""
    await run_in_threadpool(registry.expire_staging, settings.staging_ttl_s)
    try:
        path = registry.stage_path(kind[:-1], entry_id, name)
    except RegistryError as exc:
        raise _refused(exc) from None
    partial, digest, size = path.with_name(path.name + ".part"), hashlib.sha256(), 0
    try:
        with open(partial, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise PayloadTooLarge(f"{name}: larger than ATTR_MAX_UPLOAD_BYTES={settings.max_upload_bytes}")
                digest.update(chunk)
                f.write(chunk)
        partial.replace(path)
    finally:  # refused or cut off mid-stream: nothing half-written stays staged
        partial.unlink(missing_ok=True)
    return UploadedFile(name=name, size=size, sha256=digest.hexdigest())


@router.post("/models/{entry_id}", operation_id="register_model", responses=problems(400, 404, 415, 422, 503))
async def register_model(
    entry_id: EntryId, body: ModelRegistration, who: Admin, registry: RegistryDep, jobs: JobsDep
) -> ModelRegistered:
    """Register the uploaded model: a worker loads it and takes one mirrored step on a made-up example
    first; refused with the worker's reason when that fails."""
    fields = body.model_dump(exclude={"dry_run"}, exclude_none=True, mode="json")
    if body.base is not None:
        base = registry.model(body.base)
        if base is None:
            raise NotFound(f"unknown base model {body.base!r}")
        inherited = {
            "task": base.task,
            "input": base.input.model_dump(exclude_none=True),
            "task_params": base.task_params,
        }
        fields = {**inherited, "method": {"params": ["*lora_*"]}, **fields, "base_digest": base.digest}
        registry.inherit(entry_id, base, TOKENIZER_FILES)
    folder = registry.staging("model", entry_id)
    fields = {**_family_defaults(body.architecture, folder), **fields}
    if "task" not in fields or "input" not in fields:
        raise InvalidInput("task and input are required (they could not be read from the uploaded files)")
    try:
        await run_in_threadpool(registry.write_model, entry_id, fields)
        probe = await jobs.probe(entry_id)
        manifest = await run_in_threadpool(
            registry.write_model, entry_id, {**fields, "parameters": probe["parameters"]}
        )
        if not body.dry_run:
            registry.commit("model", entry_id)
            manifest = registry.model(entry_id)
    except RegistryError as exc:
        raise _refused(exc) from None
    return ModelRegistered(model=_model(manifest), probe=Probe(**probe), registered=not body.dry_run)


def _family_defaults(architecture: str, folder: FilePath) -> dict:
    """What a library's own files say: a transformers model's input spec (config.json, tokenizer.json),
    a diffusers UNet's noise schedule (scheduler_config.json)."""
    family, _, kind = architecture.partition(":")

    def read(name: str) -> dict:
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return {}

    if family == "transformers":
        config = read("config.json")
        length = config.get("n_positions") or config.get("max_position_embeddings")
        spec = {"shape": [-1], "dtype": "int64", "vocab_size": config.get("vocab_size"), "max_length": length}
        spec |= {"pad_id": config.get("pad_token_id") or 0}
        if (folder / "tokenizer.json").is_file():
            spec["text"] = "tokenizer"
        return {"task": "causal-lm" if kind == "causal-lm" else "classification", "input": spec}
    if family == "diffusers":
        schedule = read("scheduler_config.json")
        if not schedule:
            return {"task": "diffusion"}
        if schedule.get("beta_schedule", "linear") != "linear":
            raise InvalidInput(
                f"scheduler_config.json: beta_schedule {schedule['beta_schedule']!r}; only 'linear' is served"
            )
        params = {"timesteps": "num_train_timesteps", "beta_start": "beta_start", "beta_end": "beta_end"}
        return {
            "task": "diffusion",
            "task_params": {ours: schedule[theirs] for ours, theirs in params.items() if theirs in schedule},
        }
    return {}


@router.post("/datasets/{entry_id}", operation_id="register_dataset", responses=problems(400, 404, 415, 422, 429, 503))
async def register_dataset(
    entry_id: EntryId,
    body: DatasetRegistration,
    who: Admin,
    registry: RegistryDep,
    indexes: IndexesDep,
    settings: SettingsDep,
) -> DatasetRegistered:
    """Register the uploaded shards (or tokenize an uploaded JSONL corpus with a model's tokenizer); with
    `index`, then build each named model's index on it."""
    for model in body.index:
        if registry.model(model) is None:
            raise NotFound(f"unknown model {model!r} (index)")
    fields = body.model_dump(exclude={"dry_run", "text", "index"}, exclude_none=True, mode="json")
    try:
        if body.text is not None:
            model = registry.model(body.text.model)
            if model is None:
                raise NotFound(f"unknown model {body.text.model!r}")
            if model.input.text is None:
                raise InvalidInput(f"model {model.id!r} does not take text")
            t = body.text
            shard = await run_in_threadpool(registry.tokenize_jsonl, entry_id, t.file, model, t.max_length)
            fields |= {"shards": [shard], "input": model.input.model_dump(exclude_none=True)}
        elif body.input is None:
            raise InvalidInput("input is required for shards (it is the model's for a text corpus)")
        manifest = await run_in_threadpool(registry.write_dataset, entry_id, fields)
        manifest.rows(0, 0, 1)  # every shard's header is read by write_dataset; one row proves the data is there
        if not body.dry_run:
            registry.commit("dataset", entry_id)
            manifest = registry.dataset(entry_id)
    except RegistryError as exc:
        raise _refused(exc) from None
    built = []
    for model in [] if body.dry_run else body.index:
        job = resolve_index(IndexCreate(model=model, dataset=entry_id), registry, settings, await indexes.entries())
        built.append((await indexes.create(job, who, manifest.parts(settings.part_records)))[0])
    return DatasetRegistered(dataset=_dataset(manifest), registered=not body.dry_run, indexes=built)


@router.delete("/models/{entry_id}", status_code=204, operation_id="delete_model", responses=problems(404, 422))
def delete_model(entry_id: EntryId, who: Admin, registry: RegistryDep) -> Response:
    """Unregister a model (and drop anything staged for it). Finished results that used it stay readable by
    their handles; new requests naming it are refused."""
    return _delete("model", entry_id, registry)


@router.delete("/datasets/{entry_id}", status_code=204, operation_id="delete_dataset", responses=problems(404, 422))
def delete_dataset(entry_id: EntryId, who: Admin, registry: RegistryDep) -> Response:
    """Unregister a dataset (and drop anything staged for it), as a model is."""
    return _delete("dataset", entry_id, registry)


def _delete(kind: str, entry_id: str, registry) -> Response:
    """(DELETE on /models/{id} and /datasets/{id}, beside their POSTs: one path, one Allow header.)"""
    staged = registry.delete(kind, entry_id, staged=True)
    if not registry.delete(kind, entry_id) and not staged:
        raise NotFound(f"unknown {kind} {entry_id!r}")
    return Response(status_code=204)
