"""The operator's registry of models and datasets: a directory of TOML manifests plus data files.

    REGISTRY_DIR/models/<id>/model.toml        + weights (*.safetensors)
    REGISTRY_DIR/datasets/<id>/dataset.toml    + shards (*.safetensors with "inputs"[, "targets"],
                                                  or inputs/targets .npy read with allow_pickle=False)

Every file's sha256 is recorded in its manifest and verified when the worker loads it; a model's or
dataset's digest (hash of its manifest, which holds the file digests) is part of every cache key, so
a changed checkpoint never serves stale scores. This module is torch-free: the API reads manifests
through it; loading tensors is the worker's job (worker/warm.py).

    python -m worker.registry list
    python -m worker.registry demo                  # build the demo registry (digits MLPs)
    python -m worker.registry demo --generative     # ... plus a tiny GPT and DDPM (--full: bench sizes)
    python -m worker.registry add-model --id ID --task classification --architecture builtin:mlp \\
        --params '{"in_features": 64, ...}' --weights w.safetensors --input-shape 64 [--num-classes 10]
    python -m worker.registry add-dataset --id ID --shard a.safetensors --shard b.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from safetensors.numpy import load_file as load_numpy

ID = r"^[a-z0-9][a-z0-9._-]{0,63}$"


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
    method: dict[str, Any] = Field({}, description="default method settings (MirrorConfig fields)")
    digest: str = ""
    path: Path = Path()


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

    def read(self, indices: list[int]) -> dict[str, np.ndarray]:
        """Records by global index as numpy arrays ("inputs"[, "targets"]); torch-free (the API renders
        reports from these; the worker keeps whole shards warm as tensors). Indices must be in range."""
        bounds = np.cumsum([0] + [s.size for s in self.shards])
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(bounds, indices, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for n in np.unique(shard_of):
            mask = shard_of == n
            for key, value in self.load_shard(int(n)).items():
                out.setdefault(key, np.empty((len(indices), *value.shape[1:]), value.dtype))[mask] = value[
                    indices[mask] - bounds[n]
                ]
        return out

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

    def record_ids(self) -> list[str]:
        """Record ids in order: the records file (digest-checked), else '<id>:<index>'."""
        if self.records is None:
            return [f"{self.id}:{i}" for i in range(self.size)]
        ids = json.loads(verify(self.path / self.records, self.records_sha256 or "").read_text())
        if len(ids) != self.size:
            raise RegistryError(f"{self.id}: {len(ids)} record ids for {self.size} records")
        return ids


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str) -> Path:
    """Return `path` if its sha256 is `expected`; raise RegistryError otherwise."""
    if not path.is_file():
        raise RegistryError(f"{path.name}: file missing from the registry")
    actual = sha256_file(path)
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
        raise RegistryError(f"{path}: invalid manifest: {exc}") from exc


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _manifest(self, kind: str, id: str):
        if not re.match(ID, id):
            return None
        path = self.root / f"{kind}s" / id / f"{kind}.toml"
        if not path.is_file():
            return None
        return _read(path, path.stat().st_mtime_ns, kind)

    def model(self, id: str) -> ModelManifest | None:
        return self._manifest("model", id)

    def dataset(self, id: str) -> DatasetManifest | None:
        return self._manifest("dataset", id)

    def _all(self, kind: str) -> list:
        folder = self.root / f"{kind}s"
        ids = sorted(p.name for p in folder.iterdir() if (p / f"{kind}.toml").is_file()) if folder.is_dir() else []
        return [self._manifest(kind, i) for i in ids]

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
            "method": method or {},
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
    import tomli_w  # operator side only

    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return tomli_w.dumps(clean(data))


def main(argv: list[str] | None = None) -> int:
    from app.settings import Settings

    parser = argparse.ArgumentParser(
        prog="python -m worker.registry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=None, help="registry directory (default: ATTR_REGISTRY_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    demo = sub.add_parser("demo", help="build the demo registry (trains a digits MLP in seconds)")
    demo.add_argument("--if-absent", action="store_true")
    demo.add_argument("--generative", action="store_true", help="also a tiny GPT and DDPM (worker/generative.py)")
    demo.add_argument("--full", action="store_true", help="with --generative: the benchmark's sizes (minutes)")
    m = sub.add_parser("add-model")
    m.add_argument("--id", required=True)
    m.add_argument("--task", required=True)
    m.add_argument("--architecture", required=True)
    m.add_argument("--params", default="{}")
    m.add_argument("--weights", type=Path, required=True)
    m.add_argument("--input-shape", type=int, nargs="+", required=True)
    m.add_argument("--input-dtype", default="float32")
    m.add_argument("--num-classes", type=int)
    d = sub.add_parser("add-dataset")
    d.add_argument("--id", required=True)
    d.add_argument("--shard", type=Path, action="append", required=True)
    d.add_argument("--input-shape", type=int, nargs="+", required=True)
    d.add_argument("--input-dtype", default="float32")
    args = parser.parse_args(argv)
    registry = Registry(args.root or Settings().registry_dir)
    try:
        if args.command == "list":
            for item in registry.models() + registry.datasets():
                print(f"{type(item).__name__.removesuffix('Manifest').lower():8} {item.id:24} {item.digest[:12]}")  # noqa: T201 (CLI output)
        elif args.command == "demo":
            if not (args.if_absent and registry.model("digits-audit-mlp") and registry.dataset("digits-audit-test")):
                from .demo import build_demo_registry

                build_demo_registry(registry)
            if args.generative and not (args.if_absent and registry.model("digits-ddpm")):
                from .generative import build_generative_registry

                build_generative_registry(registry, full=args.full)
            print(f"demo registry built in {registry.root}")  # noqa: T201
        elif args.command == "add-model":
            spec = {"shape": args.input_shape, "dtype": args.input_dtype, "num_classes": args.num_classes}
            registry.add_model(args.id, args.task, args.architecture, args.weights, spec, json.loads(args.params))
        elif args.command == "add-dataset":
            registry.add_dataset(args.id, args.shard, {"shape": args.input_shape, "dtype": args.input_dtype})
    except (RegistryError, ValidationError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
