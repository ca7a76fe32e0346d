"""The registry's data files, read and checked: a file's sha256 once per version (path, size, mtime), a
.safetensors or .npy file's layout from its header alone, rows read by offset (a record, a batch or a
whole shard costs only its own bytes), and the tokenizer and chat template a model's folder holds. Every
parse is cached per version of its file; nothing here executes what a file says (no pickle, a sandboxed
chat template). Torch-free, like the rest of contract/.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Layout",
    "RegistryError",
    "chat_template",
    "digest",
    "layout",
    "read_rows",
    "records",
    "sha256_file",
    "tensor_names",
    "tokenizer",
    "verify",
]


class RegistryError(Exception):
    """A manifest or file in the registry is missing, malformed or does not match its digest."""


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                      "U8": "u1", "BOOL": "?"}  # fmt: skip


class Layout(NamedTuple):
    offset: int  # of the array's first byte in the file
    dtype: np.dtype
    shape: tuple[int, ...]


def _version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=1024)
def _header(path: Path, size: int, mtime_ns: int) -> tuple[int, dict[str, Any]]:
    """A .safetensors file's JSON header (names, dtypes, shapes, offsets) and its length, read alone."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > min(size, 100 << 20):
            raise RegistryError(f"{path.name}: not a safetensors file")
        return length, json.loads(f.read(length))


@lru_cache(maxsize=1024)
def _layout(path: Path, size: int, mtime_ns: int) -> dict[str, Layout]:
    """Where each array of a .safetensors file lies ({"array": ...} for a .npy file), from its header."""
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise RegistryError(f"{path.name}: unsupported .npy version {version}")
            shape, fortran, dtype = readers[version](f)
            if fortran or dtype.hasobject or not shape:
                raise RegistryError(f"{path.name}: needs a C-ordered array of numbers with a first dimension")
            layout = Layout(f.tell(), dtype, tuple(shape))
            _fits(path, size, layout.offset, dtype.itemsize * math.prod(shape), "the array")
            return {"array": layout}
    length, header = _header(path, size, mtime_ns)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES or not entry["shape"]:
            raise RegistryError(f"{path.name}: {name!r} is {entry['dtype']} {entry['shape']}: not readable as rows")
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if end - begin != dtype.itemsize * math.prod(entry["shape"]):
            raise RegistryError(f"{path.name}: {name!r}'s offsets do not hold its shape {entry['shape']}")
        out[name] = Layout(8 + length + begin, dtype, tuple(entry["shape"]))
        _fits(path, size, out[name].offset, end - begin, repr(name))
    return out


def _fits(path: Path, size: int, offset: int, nbytes: int, what: str) -> None:
    """Refuse a file shorter than its header says (a header may claim any number of rows)."""
    if offset + nbytes > size:
        raise RegistryError(f"{path.name}: its header puts {what} at bytes {offset}..{offset + nbytes}, past its "
                            f"{size} bytes")  # fmt: skip


def read_rows(path: Path, layout: Layout, rows: np.ndarray) -> np.ndarray:
    """Rows of one array, each run of consecutive rows read with one call, straight into the result."""
    out = np.empty((len(rows), *layout.shape[1:]), layout.dtype)
    row_bytes = layout.dtype.itemsize * math.prod(layout.shape[1:])
    if not len(rows):
        return out
    view = memoryview(out.reshape(-1).view(np.uint8))
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    with open(path, "rb", buffering=0) as f:
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
            f.seek(layout.offset + int(rows[start]) * row_bytes)
            want = (stop - start) * row_bytes
            if f.readinto(view[start * row_bytes : stop * row_bytes]) != want:
                raise RegistryError(f"{path.name}: shorter than its header says")
    return out


@lru_cache(maxsize=16)
def _tokenizer(path: Path, size: int, mtime_ns: int):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises its own exception type
        raise RegistryError(f"{path.name}: not a tokenizers file: {exc}") from exc


@lru_cache(maxsize=16)
def _chat_template(path: Path, size: int, mtime_ns: int):
    """tokenizer_config.json's chat template compiled in Jinja's immutable sandbox (the template is data from
    the model's folder: it must not reach Python), with its special tokens (bos_token, ...) to render with."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config = json.loads(path.read_text())
    source = config.get("chat_template")
    if isinstance(source, list):  # several named templates: the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        raise RegistryError(f"{path.name}: no chat_template")

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    tokens = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items() if k.endswith("_token")}
    try:
        return env.from_string(source), tokens
    except TemplateError as exc:
        raise RegistryError(f"{path.name}: chat_template does not compile: {exc}") from exc


@lru_cache(maxsize=64)
def _parse_records(path: Path, size: int, mtime_ns: int) -> tuple[tuple[str, ...], dict[str, int]]:
    ids = tuple(json.loads(path.read_text()))
    return ids, {r: i for i, r in enumerate(ids)}


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


# -- per version of the file: path, size and mtime ---------------------------------------------------------
def digest(path: Path) -> str:
    return _digest(path, *_version(path))


def layout(path: Path) -> dict[str, Layout]:
    return _layout(path, *_version(path))


def tensor_names(path: Path) -> tuple[str, ...]:
    """The arrays a .safetensors file holds, from its header alone."""
    return tuple(sorted(k for k in _header(path, *_version(path))[1] if k != "__metadata__"))


def tokenizer(path: Path):
    return _tokenizer(path, *_version(path))


def chat_template(path: Path):
    return _chat_template(path, *_version(path))


def records(path: Path) -> tuple[tuple[str, ...], dict[str, int]]:
    """A records file's ids in order and id -> index."""
    return _parse_records(path, *_version(path))
