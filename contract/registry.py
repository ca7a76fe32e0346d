"""The operator's registry of models and datasets: a directory of TOML manifests plus data files.

    REGISTRY_DIR/models/<id>/model.toml        + weights (*.safetensors)
    REGISTRY_DIR/datasets/<id>/dataset.toml    + shards (*.safetensors with "inputs"[, "targets"],
                                                  or inputs/targets .npy read with allow_pickle=False)

Every file's sha256 is recorded in its manifest and verified before it is read; a model's or dataset's
digest (the hash of its manifest, which holds the file digests) is part of every job's identity, so a
changed checkpoint or test set never serves a stale result. A file is hashed once per version (path,
size, mtime): the API's request path re-reads records, it never re-hashes a shard. Rows are read from a
shard's file by offset (contract/datafiles.py), so a worker streams a shard larger than its memory batch
by batch. Torch-free: the API
reads manifests and records (numpy) through this module; the worker loads tensors (worker/warm.py).
The command line (`python -m worker.registry`) lives with the worker, which can build the demo models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tomli_w
from pydantic import BaseModel, Field, ValidationError

from . import datafiles
from .datafiles import Layout, RegistryError
from .method import MethodDefaults

ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"
FILE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # an uploaded file's name
STAGING = ".staging"  # under the registry root: entries being registered over HTTP
UPLOAD_SUFFIXES = (".safetensors", ".json", ".jsonl", ".npy", ".txt", ".md")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHTS = (
    "model.safetensors",
    "adapter_model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "weights.safetensors",
)
BUILTINS = ("mlp", "cnn", "gpt", "unet")  # the engine's zoo (worker/forward_inf/zoo.py; a test checks they agree)
# What registration over HTTP may name: the zoo, or a library family read from the model's folder
# (worker/forward_inf/families.py). Neither imports or calls anything the request chooses.
FAMILIES = {  # family -> the kinds it names (worker/forward_inf/families.py loads them; a test checks they agree)
    "transformers": "causal-lm|sequence-classification",
    "peft": "lora",
    "diffusers": "unet2d",
    "torchvision": "[a-z0-9_]+",
}
REGISTERABLE = (
    rf"^(builtin:({'|'.join(BUILTINS)})|" + "|".join(f"{family}:({kinds})" for family, kinds in FAMILIES.items()) + ")$"
)
# A manifest on disk may also name operator code, python:package.module:factory, which a worker imports only
# when the operator allowed the module by name (ATTR_PYTHON_ARCHITECTURES): never from a request.
ARCHITECTURE = REGISTERABLE.removesuffix(")$") + r"|python:[\w.]+:\w+)$"
log = logging.getLogger("contract.registry")


def operator_code(architecture: str, allowed: Sequence[str]) -> tuple[str, str]:
    """(module, factory) of a python:package.module:factory architecture, when the operator allowed the module
    by name (ATTR_PYTHON_ARCHITECTURES); RegistryError otherwise."""
    _, module, factory = architecture.split(":")
    if module not in allowed:
        raise RegistryError(
            f"architecture {architecture!r}: operator code runs only from modules the operator allowed by name "
            f"(ATTR_PYTHON_ARCHITECTURES); {module!r} is not one of them"
        )
    return module, factory


class InputSpec(BaseModel):
    shape: list[int] = Field(description="shape of one example, e.g. [64] or [1, 8, 8]; -1 = any length")
    dtype: Literal["float32", "int64"] = "float32"
    range: tuple[float, float] | None = None
    num_classes: int | None = Field(None, description="classification: labels lie in 0..num_classes-1")
    vocab_size: int | None = None
    image_shape: list[int] | None = Field(
        None, description="show examples as images of this (H, W) or (C, H, W) shape in reports, e.g. [8, 8]"
    )
    text: Literal["bytes", "tokenizer"] | None = Field(
        None,
        description='requests may give text, reports show text: "bytes" (token ids are UTF-8 bytes) or "tokenizer" '
        "(the model's own tokenizer.json)",
    )
    pad_id: int = Field(0, ge=0, description="the token id that pads sequences (excluded from text and attention)")
    max_length: int | None = Field(None, description="longest token sequence the model takes")


class ModelManifest(BaseModel):
    id: str = Field(pattern=ID)
    version: str = "1"
    description: str = ""
    task: Literal["classification", "regression", "causal-lm", "diffusion"]
    task_params: dict[str, Any] = {}
    architecture: str = Field(pattern=ARCHITECTURE)
    params: dict[str, Any] = {}
    weights: str
    sha256: str
    files: dict[str, str] = Field({}, description="the model directory's other files (config, tokenizer) -> sha256")
    base: str | None = Field(None, pattern=ID, description="peft:lora: the registered base model's id")
    base_digest: str | None = Field(None, description="the base's digest the adapter was registered against")
    parameters: list[str] = Field([], description="the loaded module's parameter names (written at registration)")
    input: InputSpec
    method: MethodDefaults = Field(default_factory=MethodDefaults, description="the model's default method settings")
    batch_size: int | None = Field(None, ge=1, description="training records per forward batch (else ATTR_BATCH_SIZE)")
    digest: str = ""
    path: Path = Path()

    def tensor_names(self) -> tuple[str, ...]:
        """The module's parameter names as registration recorded them, else the names in the weights file
        (parameters and buffers, from its header alone: a built-in model's state dict)."""
        if self.parameters:
            return tuple(self.parameters)
        path = self.path / self.weights
        return datafiles.tensor_names(path)

    def verified(self) -> Path:
        """The model's folder, once every file the manifest names matches its digest."""
        for name, digest in {self.weights: self.sha256, **self.files}.items():
            datafiles.verify(self.path / name, digest)
        return self.path

    def encode(self, text: str) -> list[int]:
        """Text -> token ids: the model's own tokenizer (no special tokens added), or UTF-8 bytes."""
        if self.input.text == "tokenizer":
            return self._tokenizer().encode(text, add_special_tokens=False).ids
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        if self.input.text == "tokenizer":
            return self._tokenizer().decode(list(ids), skip_special_tokens=False)
        return bytes(t for t in ids if 0 <= t < 256).decode("utf-8", "replace")

    def chat(self, messages: list[dict]) -> str:
        """A conversation rendered by the model's chat template (tokenizer_config.json's `chat_template`), as
        transformers' apply_chat_template renders it (sandboxed Jinja), ending with the generation prompt."""
        if "tokenizer_config.json" not in self.files:
            raise RegistryError(f"model {self.id!r} has no chat template (no tokenizer_config.json)")
        path = datafiles.verify(self.path / "tokenizer_config.json", self.files["tokenizer_config.json"])
        template, tokens = datafiles.chat_template(path)
        from jinja2 import TemplateError

        try:
            return template.render(messages=messages, add_generation_prompt=True, **tokens)
        except TemplateError as exc:  # the template's own raise_exception, or a sandbox refusal
            raise RegistryError(f"the chat template refused the conversation: {exc}") from exc

    def _tokenizer(self):
        """The model's tokenizer.json as a tokenizers.Tokenizer (torch-free), parsed once per version."""
        if "tokenizer.json" not in self.files:
            raise RegistryError(f"model {self.id!r}: input.text is 'tokenizer' but it has no tokenizer.json")
        path = datafiles.verify(self.path / "tokenizer.json", self.files["tokenizer.json"])
        return datafiles.tokenizer(path)


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

    def parts(self, records: int) -> list[tuple[int, int]]:
        """Consecutive shards [first, stop) grouped into parts of at most `records` records (a larger shard
        is a part of its own): what one shard job sweeps."""
        out, first, count = [], 0, 0
        for n, shard in enumerate(self.shards):
            if n > first and count + shard.size > records:
                out.append((first, n))
                first, count = n, 0
            count += shard.size
        return [*out, (first, len(self.shards))]

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Records by global index as numpy arrays ("inputs"[, "targets"]), reading only those rows of
        each shard (verified files; reports and test points given by reference). Indices must be in range."""
        bounds = self.bounds
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(bounds, indices, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for n in np.unique(shard_of):
            mask = shard_of == n
            for key, rows in self._arrays(int(n), indices[mask] - bounds[n]).items():
                out.setdefault(key, np.empty((len(indices), *rows.shape[1:]), rows.dtype))[mask] = rows
        return out

    def rows(
        self, n: int, lo: int = 0, hi: int | None = None, keys: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of shard n ("inputs"[, "targets"], or only `keys`), digest-checked, as numpy
        arrays (no pickle)."""
        size = self.shards[n].size
        hi = size if hi is None else min(hi, size)
        return self._arrays(n, np.arange(lo, hi), keys)

    def batches(self, n: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Shard n in batches of `batch_size` rows, each read on its own (memory: one batch)."""
        for lo in range(0, self.shards[n].size, batch_size):
            yield self.rows(n, lo, lo + batch_size)

    def shard_bytes(self, n: int) -> int:
        """Bytes of shard n's arrays once in memory (from the file headers)."""
        return sum(layout.dtype.itemsize * math.prod(layout.shape) for _, layout in self._files(n).values())

    def _arrays(self, n: int, rows: np.ndarray, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        files = self._files(n)
        return {
            key: datafiles.read_rows(file, layout, rows)
            for key, (file, layout) in files.items()
            if key in (keys or files)
        }

    def _files(self, n: int) -> dict[str, tuple[Path, Layout]]:
        """Where shard n's "inputs" (and "targets") lie: verified files and their arrays' layouts."""
        shard = self.shards[n]
        path = datafiles.verify(self.path / shard.file, shard.sha256)
        if path.suffix == ".npy":
            files = {"inputs": (path, "array")}
            if shard.targets:
                files["targets"] = (datafiles.verify(self.path / shard.targets, shard.targets_sha256 or ""), "array")
        else:
            files = {"inputs": (path, "inputs"), "targets": (path, "targets")}
        out = {}
        for key, (file, name) in files.items():
            layout = datafiles.layout(file).get(name)
            if layout is None:
                continue
            if layout.shape[0] != shard.size:
                raise RegistryError(
                    f"dataset {self.id!r} shard {n}: {key} has {layout.shape[0]} rows, not {shard.size}"
                )
            out[key] = (file, layout)
        if "inputs" not in out:
            raise RegistryError(f"dataset {self.id!r} shard {n}: no 'inputs' array")
        return out

    def record_ids(self) -> Sequence[str]:
        """Record ids in order: the records file (digest-checked, parsed once per version), else
        '<id>:<index>' (computed when asked, never held: a training set may have 10^9 records)."""
        return self._records()[0]

    def positions(self) -> Mapping[str, int]:
        """Record id -> global index (the one mapping from ids to indices)."""
        return self._records()[1]

    def _records(self) -> tuple[Sequence[str], Mapping[str, int]]:
        if self.records is None:
            ids = Numbered(self.id, self.size)
            return ids, ids.positions
        path = datafiles.verify(self.path / self.records, self.records_sha256 or "")
        ids, positions = datafiles.records(path)
        if len(ids) != self.size:
            raise RegistryError(f"{self.id}: {len(ids)} record ids for {self.size} records")
        return ids, positions


class Numbered(Sequence[str]):
    """The default record ids '<dataset id>:<index>', as a sequence that holds none of them."""

    def __init__(self, dataset: str, size: int):
        self.prefix, self.size = f"{dataset}:", size
        self.positions = _NumberedPositions(self)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.size))]
        if not -self.size <= i < self.size:
            raise IndexError(i)
        return f"{self.prefix}{i % self.size}"


class _NumberedPositions(Mapping[str, int]):
    def __init__(self, ids: Numbered):
        self.ids = ids

    def __getitem__(self, record: str) -> int:
        number = record.removeprefix(self.ids.prefix)
        if number == record or not number.isdigit() or str(int(number)) != number or int(number) >= self.ids.size:
            raise KeyError(record)
        return int(number)

    def __iter__(self) -> Iterator[str]:
        return (self.ids[i] for i in range(self.ids.size))

    def __len__(self) -> int:
        return self.ids.size


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

    def _manifest(self, kind: str, id: str, staged: bool = False):
        if not re.match(ID, id):
            return None
        path = (self.root / STAGING if staged else self.root) / f"{kind}s" / id / f"{kind}.toml"
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

    # -- registration over HTTP (app/routes/admin.py): files staged one by one, then the entry whole ------
    def staging(self, kind: str, id: str) -> Path:
        """The staging folder of a model or dataset being registered ("model" | "dataset")."""
        if not re.match(ID, id):
            raise RegistryError(f"invalid id {id!r}: lowercase letters, digits, '.', '_', '-'")
        return self.root / STAGING / f"{kind}s" / id

    def expire_staging(self, max_age_s: float) -> int:
        """Remove staged entries (uploads never registered) untouched for `max_age_s`; returns how many."""
        removed = 0
        for folder in (self.root / STAGING / kind for kind in ("models", "datasets")):
            for entry in folder.iterdir() if folder.is_dir() else ():
                times = [p.stat().st_mtime for p in entry.iterdir()] or [entry.stat().st_mtime]
                if time.time() - max(times) > max_age_s:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
        return removed

    def stage_path(self, kind: str, id: str, name: str) -> Path:
        """Where an uploaded file goes; refuses names outside FILE and pickle formats."""
        suffix = Path(name).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise RegistryError(
                f"{name}: pickle checkpoints are refused (loading one runs code); save safetensors instead, e.g. "
                "save_pretrained(..., safe_serialization=True) or safetensors.torch.save_file(state_dict, ...)"
            )
        if not re.match(FILE, name) or suffix not in UPLOAD_SUFFIXES:
            raise RegistryError(f"{name!r}: a file name of letters, digits, '.', '_', '-' ending {UPLOAD_SUFFIXES}")
        folder = self.staging(kind, id)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def inherit(self, id: str, base: ModelManifest, names: tuple[str, ...]) -> None:
        """Copy the base's files `names` (verified) into a staged adapter that did not upload its own (its
        tokenizer: text requests and reports use the adapter's folder alone)."""
        folder = self.staging("model", id)
        for name in names:
            if name in base.files and not (folder / name).exists():
                shutil.copyfile(datafiles.verify(base.path / name, base.files[name]), folder / name)

    def staged_model(self, id: str) -> ModelManifest | None:
        return self._manifest("model", id, staged=True)

    def write_model(self, id: str, fields: dict) -> ModelManifest:
        """The staged model's manifest from `fields` (task, architecture, weights, input, ...), with every
        staged file's digest; validated, written to staging (commit() makes it live)."""
        folder = self.staging("model", id)
        files = _staged_files(folder, "model.toml")
        weights = fields.get("weights") or next((n for n in WEIGHTS if n in files), "")
        if weights not in files:
            raise RegistryError(f"model {id!r}: no weights file ({weights or ' or '.join(WEIGHTS)}) was uploaded")
        manifest = {**fields, "id": id, "weights": weights, "sha256": files.pop(weights), "files": files}
        return self._write(folder, "model", manifest)

    def write_dataset(self, id: str, fields: dict) -> DatasetManifest:
        """The staged dataset's manifest: shards in the order `fields["shards"]` names them (each with its
        row count from its header, `.npy` inputs with an optional `<stem>.targets.npy`), the records file if
        uploaded."""
        folder = self.staging("dataset", id)
        files = _staged_files(folder, "dataset.toml")
        shards = []
        for name in fields.pop("shards"):
            if name not in files:
                raise RegistryError(f"dataset {id!r}: shard {name!r} was not uploaded")
            shard = {"file": name, "sha256": files[name], "size": _count(folder / name)}
            targets = f"{Path(name).stem}.targets.npy"
            if name.endswith(".npy") and targets in files:
                shard.update(targets=targets, targets_sha256=files[targets])
            shards.append(shard)
        manifest = {**fields, "id": id, "shards": shards}
        if "records.json" in files:
            manifest.update(records="records.json", records_sha256=files["records.json"])
        return self._write(folder, "dataset", manifest)

    def tokenize_jsonl(self, id: str, name: str, model: ModelManifest, max_length: int) -> str:
        """A staged JSONL text corpus (one {"text"} or {"prompt", "completion"} object per line, optional
        "id") as a shard of `model`'s token ids: "inputs" (N, max_length) padded with its pad id, "targets"
        the mask of tokens whose prediction counts (the completion's, else all). Longer texts are cut at
        max_length (their end is dropped). Returns the shard's name; ids (when every line has one) go to
        records.json."""
        from safetensors.numpy import save_file

        folder = self.staging("dataset", id)
        path = folder / name
        if not path.is_file() or path.suffix != ".jsonl":
            raise RegistryError(f"dataset {id!r}: {name!r} is not an uploaded .jsonl file")
        inputs, masks, ids = [], [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                head, tail = (row["text"], "") if "text" in row else (row["prompt"], row["completion"])
                if not isinstance(head, str) or not isinstance(tail, str):
                    raise TypeError("text fields must be strings")
            except (ValueError, KeyError, TypeError) as exc:
                raise RegistryError(
                    f"{name} line {n}: {exc!r}: expected {{'text'}} or {{'prompt', 'completion'}}"
                ) from exc
            a, b = model.encode(head), model.encode(tail)
            tokens, mask = (a + b)[:max_length], ([0] * len(a) + [1] * len(b) if tail else [1] * len(a))[:max_length]
            if sum(mask[1:]) == 0:
                raise RegistryError(f"{name} line {n}: no token to predict within {max_length} tokens")
            inputs.append(tokens + [model.input.pad_id] * (max_length - len(tokens)))
            masks.append(mask + [0] * (max_length - len(mask)))
            ids.append(row.get("id"))
        if not inputs:
            raise RegistryError(f"{name}: no records")
        shard = f"{path.stem}.safetensors"
        arrays = {"inputs": np.asarray(inputs, np.int64), "targets": np.asarray(masks, np.int64)}
        save_file(arrays, str(folder / shard))
        if all(isinstance(i, str) for i in ids):
            (folder / "records.json").write_text(json.dumps(ids))
        path.unlink()  # the shard replaces it
        return shard

    def _write(self, folder: Path, kind: str, manifest: dict):
        manifest = {"version": "1", **manifest}
        try:
            (ModelManifest if kind == "model" else DatasetManifest)(**manifest)  # validate before writing
        except ValidationError as exc:
            raise RegistryError(f"{kind} {manifest['id']!r}: invalid manifest: {exc}") from exc
        (folder / f"{kind}.toml").write_text(_toml(manifest))
        return self._manifest(kind, manifest["id"], staged=True)

    def commit(self, kind: str, id: str) -> None:
        """Make a staged entry live, replacing any entry of that id whole (two renames): its new digest
        gives every request a new identity, so no result of the old one is served for it."""
        staged, live = self.staging(kind, id), self.root / f"{kind}s" / id
        if not (staged / f"{kind}.toml").is_file():
            raise RegistryError(f"{kind} {id!r}: nothing staged")
        live.parent.mkdir(parents=True, exist_ok=True)
        old = self.root / STAGING / "replaced" / f"{kind}-{id}-{uuid.uuid4().hex[:8]}"
        if live.exists():
            old.parent.mkdir(parents=True, exist_ok=True)
            live.rename(old)
        staged.rename(live)
        shutil.rmtree(old, ignore_errors=True)

    def delete(self, kind: str, id: str, staged: bool = False) -> bool:
        folder = self.staging(kind, id) if staged else self.root / f"{kind}s" / id
        if not re.match(ID, id) or not folder.is_dir():
            return False
        shutil.rmtree(folder)
        return True

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
            "sha256": datafiles.sha256_file(folder / "weights.safetensors"),
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
                    "sha256": datafiles.sha256_file(folder / name),
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
            manifest["records"], manifest["records_sha256"] = (
                "records.json",
                datafiles.sha256_file(folder / "records.json"),
            )
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


def _staged_files(folder: Path, manifest: str) -> dict[str, str]:
    """Name -> sha256 of every uploaded file in a staging folder (its manifest and unfinished uploads aside),
    each hashed once per version."""
    if not folder.is_dir():
        raise RegistryError(f"{folder.name}: nothing was uploaded")
    done = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != manifest and p.suffix != ".part"]
    return {p.name: datafiles.digest(p) for p in done}


def _count(path: Path) -> int:
    """Examples in a shard, from its header alone."""
    layout = datafiles.layout(path)
    return layout["array" if path.suffix == ".npy" else "inputs"].shape[0]


def _toml(data: dict) -> str:
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return tomli_w.dumps(clean(data))
