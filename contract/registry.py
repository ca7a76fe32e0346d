"""The operator's registry of models and datasets: a directory of TOML manifests plus data files.

    REGISTRY_DIR/models/<id>/model.toml        + weights (*.safetensors)
    REGISTRY_DIR/datasets/<id>/dataset.toml    + shards (*.safetensors with "inputs"[, "targets"],
                                                  or inputs/targets .npy read with allow_pickle=False)

Every file's sha256 is recorded in its manifest and verified before it is read; a model's or dataset's
digest (the hash of its manifest, which holds the file digests) is part of every job's identity, so a
changed checkpoint or test set never serves a stale result. A file is hashed once per version (path,
size, mtime): the API's request path re-reads records, it never re-hashes a shard. Torch-free: the API
reads manifests and records (numpy) through this module; the worker loads tensors (worker/warm.py).
The command line (`python -m worker.registry`) lives with the worker, which can build the demo models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tomli_w
from pydantic import BaseModel, Field, ValidationError
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy

from .method import MethodDefaults

ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"
log = logging.getLogger("contract.registry")


class RegistryError(Exception):
    """A manifest or file in the registry is missing, malformed or does not match its digest."""


class InputSpec(BaseModel):
    shape: list[int] = Field(description="shape of one example, e.g. [64] or [1, 8, 8]; -1 = any length")
    dtype: Literal["float32", "int64"] = "float32"
    range: tuple[float, float] | None = None
    num_classes: int | None = Field(None, description="classification: labels lie in 0..num_classes-1")
    vocab_size: int | None = None
    image_shape: list[int] | None = Field(
        None, description="show examples as images of this (H, W) or (C, H, W) shape in reports, e.g. [8, 8]"
    )
    text: Literal["bytes"] | None = Field(
        None, description="token ids are UTF-8 bytes (0 pads): requests may give text, reports show text"
    )
    max_length: int | None = Field(None, description="longest token sequence the model takes")


class ModelManifest(BaseModel):
    id: str = Field(pattern=ID)
    version: str = "1"
    description: str = ""
    task: Literal["classification", "regression", "causal-lm", "diffusion"]
    task_params: dict[str, Any] = {}
    architecture: str = Field(pattern=r"^(builtin:[a-z0-9_]+|python:[\w.]+:\w+)$")
    params: dict[str, Any] = {}
    weights: str
    sha256: str
    input: InputSpec
    method: MethodDefaults = Field(default_factory=MethodDefaults, description="the model's default method settings")
    digest: str = ""
    path: Path = Path()

    def tensor_names(self) -> tuple[str, ...]:
        """The names in the weights file (parameters and buffers), from its header alone."""
        path = self.path / self.weights
        stat = path.stat()
        return _header_names(path, stat.st_size, stat.st_mtime_ns)


class Shard(BaseModel):
    file: str
    sha256: str
    size: int
    targets: str | None = None
    targets_sha256: str | None = None


class DatasetManifest(BaseModel):
    id: str = Field(pattern=ID)
    version: str = "1"
    description: str = ""
    input: InputSpec
    shards: list[Shard]
    records: str | None = Field(None, description="JSON list of record ids; default '<id>:<index>'")
    records_sha256: str | None = None
    trained: list[str] = []
    digest: str = ""
    path: Path = Path()

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def bounds(self) -> np.ndarray:
        """(shards + 1,) the global index of each shard's first record, then the size."""
        return np.cumsum([0] + [s.size for s in self.shards])

    def read(self, indices: list[int]) -> dict[str, np.ndarray]:
        """Records by global index as numpy arrays ("inputs"[, "targets"]), reading only those rows of
        each shard (verified files; the API renders reports from these). Indices must be in range."""
        bounds = self.bounds
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(bounds, indices, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for n in np.unique(shard_of):
            mask = shard_of == n
            for key, rows in self._rows(int(n), (indices[mask] - bounds[n]).tolist()).items():
                out.setdefault(key, np.empty((len(indices), *rows.shape[1:]), rows.dtype))[mask] = rows
        return out

    def _rows(self, n: int, rows: list[int]) -> dict[str, np.ndarray]:
        shard = self.shards[n]
        path = verify(self.path / shard.file, shard.sha256)
        if path.suffix == ".npy":
            data = {"inputs": np.load(path, mmap_mode="r", allow_pickle=False)[rows]}
            if shard.targets:
                targets = verify(self.path / shard.targets, shard.targets_sha256 or "")
                data["targets"] = np.load(targets, mmap_mode="r", allow_pickle=False)[rows]
            return data
        with safe_open(path, framework="numpy") as f:
            names = [k for k in ("inputs", "targets") if k in f.keys()]
            return {k: np.stack([f.get_slice(k)[i : i + 1][0] for i in rows]) for k in names}

    def load_shard(self, n: int) -> dict[str, np.ndarray]:
        """Shard n's "inputs" (and "targets"), digest-checked, as numpy arrays (no pickle)."""
        shard = self.shards[n]
        path = verify(self.path / shard.file, shard.sha256)
        if path.suffix == ".npy":
            data = {"inputs": np.load(path, allow_pickle=False)}
            if shard.targets:
                targets = verify(self.path / shard.targets, shard.targets_sha256 or "")
                data["targets"] = np.load(targets, allow_pickle=False)
        else:
            data = {k: v for k, v in load_numpy(path).items() if k in ("inputs", "targets")}
        if "inputs" not in data or len(data["inputs"]) != shard.size:
            raise RegistryError(f"dataset {self.id!r} shard {n}: expected 'inputs' with {shard.size} examples")
        return data

    def record_ids(self) -> tuple[str, ...]:
        """Record ids in order: the records file (digest-checked, parsed once per version), else '<id>:<index>'."""
        return self._records()[0]

    def positions(self) -> dict[str, int]:
        """Record id -> global index (the one mapping from ids to indices)."""
        return self._records()[1]

    def _records(self) -> tuple[tuple[str, ...], dict[str, int]]:
        if self.records is None:
            return _default_records(self.id, self.size)
        path = verify(self.path / self.records, self.records_sha256 or "")
        stat = path.stat()
        ids, positions = _parse_records(path, stat.st_size, stat.st_mtime_ns)
        if len(ids) != self.size:
            raise RegistryError(f"{self.id}: {len(ids)} record ids for {self.size} records")
        return ids, positions


@lru_cache(maxsize=64)
def _default_records(id: str, size: int) -> tuple[tuple[str, ...], dict[str, int]]:
    ids = tuple(f"{id}:{i}" for i in range(size))
    return ids, {r: i for i, r in enumerate(ids)}


@lru_cache(maxsize=64)
def _parse_records(path: Path, size: int, mtime_ns: int) -> tuple[tuple[str, ...], dict[str, int]]:
    ids = tuple(json.loads(path.read_text()))
    return ids, {r: i for i, r in enumerate(ids)}


@lru_cache(maxsize=256)
def _header_names(path: Path, size: int, mtime_ns: int) -> tuple[str, ...]:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return tuple(sorted(k for k in header if k != "__metadata__"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=4096)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def verify(path: Path, expected: str) -> Path:
    """Return `path` if its sha256 is `expected`; raise RegistryError otherwise. The digest is computed
    once per version of the file (path, size, mtime)."""
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or not path.is_file():
        raise RegistryError(f"{path.name}: file missing from the registry")
    actual = _digest(path, stat.st_size, stat.st_mtime_ns)
    if actual != expected:
        raise RegistryError(
            f"{path.name}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}... (file changed?)"
        )
    return path


@lru_cache(maxsize=256)
def _read(path: Path, mtime_ns: int, kind: str):
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode())
        cls = ModelManifest if kind == "model" else DatasetManifest
        return cls(**data, digest=hashlib.sha256(raw).hexdigest(), path=path.parent)
    except (tomllib.TOMLDecodeError, ValidationError, UnicodeDecodeError) as exc:
        where = f"{path.parent.parent.name}/{path.parent.name}/{path.name}"  # never the server's absolute path
        raise RegistryError(f"{where}: invalid manifest: {exc}") from exc


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _manifest(self, kind: str, id: str):
        if not re.match(ID, id):
            return None
        path = self.root / f"{kind}s" / id / f"{kind}.toml"
        try:
            return _read(path, path.stat().st_mtime_ns, kind)  # one stat: parsed once per version
        except (FileNotFoundError, NotADirectoryError):
            return None

    def model(self, id: str) -> ModelManifest | None:
        return self._manifest("model", id)

    def dataset(self, id: str) -> DatasetManifest | None:
        return self._manifest("dataset", id)

    def _all(self, kind: str) -> list:
        """Every valid entry; an invalid one is left out of the list (and logged), not fatal to it."""
        folder = self.root / f"{kind}s"
        ids = sorted(p.name for p in folder.iterdir() if (p / f"{kind}.toml").is_file()) if folder.is_dir() else []
        entries = []
        for id in ids:
            try:
                entries.append(self._manifest(kind, id))
            except RegistryError as exc:
                log.error("registry: %s left out: %s", kind, exc)
        return [e for e in entries if e is not None]

    def models(self) -> list[ModelManifest]:
        return self._all("model")

    def datasets(self) -> list[DatasetManifest]:
        return self._all("dataset")

    # -- writing (operator side) -----------------------------------------------------------------------
    def add_model(
        self,
        id: str,
        task: str,
        architecture: str,
        weights: Path,
        input: dict,
        params: dict | None = None,
        method: dict | None = None,
        description: str = "",
        task_params: dict | None = None,
    ) -> ModelManifest:
        folder = self._fresh_folder("models", id)
        shutil.copyfile(weights, folder / "weights.safetensors")
        manifest = {
            "id": id,
            "version": "1",
            "description": description,
            "task": task,
            "architecture": architecture,
            "weights": "weights.safetensors",
            "sha256": sha256_file(folder / "weights.safetensors"),
            "params": params or {},
            "task_params": task_params or {},
            "input": input,
            "method": MethodDefaults(**(method or {})).model_dump(exclude_none=True),
        }
        ModelManifest(**manifest)  # validate before writing
        (folder / "model.toml").write_text(_toml(manifest))
        return self.model(id)

    def add_dataset(
        self,
        id: str,
        shards: list[Path],
        input: dict,
        records: list[str] | None = None,
        trained: list[str] | None = None,
        description: str = "",
        sizes: list[int] | None = None,
    ) -> DatasetManifest:
        folder = self._fresh_folder("datasets", id)
        entries = []
        for n, src in enumerate(shards):
            name = f"shard-{n:03d}{Path(src).suffix}"
            shutil.copyfile(src, folder / name)
            entries.append(
                {
                    "file": name,
                    "sha256": sha256_file(folder / name),
                    "size": (sizes or [])[n] if sizes else _count(folder / name),
                }
            )
        manifest: dict[str, Any] = {
            "id": id,
            "version": "1",
            "description": description,
            "input": input,
            "trained": trained or [],
            "shards": entries,
        }
        if records is not None:
            (folder / "records.json").write_text(json.dumps(records))
            manifest["records"], manifest["records_sha256"] = "records.json", sha256_file(folder / "records.json")
        DatasetManifest(**manifest)
        (folder / "dataset.toml").write_text(_toml(manifest))
        return self.dataset(id)

    def _fresh_folder(self, kind: str, id: str) -> Path:
        if not re.match(ID, id):
            raise RegistryError(f"invalid id {id!r}: lowercase letters, digits, '.', '_', '-'")
        folder = self.root / kind / id
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder


def _count(path: Path) -> int:
    """Examples in a shard, read from the safetensors header (JSON) without loading tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header["inputs"]["shape"][0]


def _toml(data: dict) -> str:
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return tomli_w.dumps(clean(data))
