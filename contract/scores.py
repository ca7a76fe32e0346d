"""The score store: where a result's (rows, N) float32 score matrix lives. Workers write it, the API reads
windows of it; both name its parts here.

A result is a list of column blocks, one per shard job (part): block [lo, hi) holds the scores of training
records lo..hi-1 for every row, row-major little-endian float32. A block of at most
`score_redis_max_bytes` lives in Redis (`fi:block:<key>:<lo>`, with the result's TTL); a larger one is an
.npy file `score_dir/<key>/<lo>.npy` (a shared volume, or network storage past one host), removed by the
workers' maintenance once its result is gone (expired or deleted) and it is older than a job's time limit.
Curvature estimates use the same two places (`fi:blob:<id>`, `score_dir/blobs/<id>.safetensors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from .settings import Settings

__all__ = ["Block", "blob_key", "blob_path", "block_key", "block_path", "place"]

Place = Literal["redis", "file"]


class Block(BaseModel):
    """Columns [lo, hi) of a result's score matrix, and where they are."""

    lo: int
    hi: int
    at: Place


def place(settings: Settings, nbytes: int) -> Place:
    return "redis" if nbytes <= settings.score_redis_max_bytes else "file"


def block_key(settings: Settings, key: str, lo: int) -> str:
    return settings.key("block", key, str(lo))


def block_path(settings: Settings, key: str, lo: int) -> Path:
    return settings.score_dir / key / f"{lo}.npy"


def blob_key(settings: Settings, name: str) -> str:
    return settings.key("blob", name)


def blob_path(settings: Settings, name: str) -> Path:
    return settings.score_dir / "blobs" / f"{name}.safetensors"
