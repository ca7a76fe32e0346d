"""The training-side index of two-stage attribution: where its parts lie and the catalog entry that says what
an index holds. Workers build it (worker/index.py), the API lists, shows and deletes it and resolves
requests against it; both name its parts here.

    fi:index:<id>                       the catalog entry (`IndexEntry`, JSON), written when the build ends;
                                        kept until deleted (no TTL: an index is built once, used for long)
    fi:indexes                          the set of catalog ids
    fi:index-orphans                    the bases of deleted indexes, by deletion time: a worker's maintenance
                                        frees the files no remaining index uses (the API mounts the score
                                        directory read-only)
    score_dir/indexes/<basis>/basis.safetensors   the sketch basis (B and Q; names, sizes in its metadata)
    score_dir/indexes/<basis>/<shard>.faiss       one shard's sketches as a FAISS index (faiss' own format)
    score_dir/indexes/<basis>/<shard>.inputs.faiss   its records' input embedding (leakage), where inputs
                                                  are float vectors or text
    score_dir/indexes/<basis>/inputs.safetensors  how inputs are embedded (a sample's spread, a projection)

An index is identified by its build job's key (IndexJob.key: the model and dataset digests, the method,
the settings, the dtype, ENGINE_VERSION), so a changed model or dataset never finds an old one. A shard's
sketches are named by the basis and the shard file's sha256: a new version of a dataset that keeps its
shards and adopts the old basis (IndexJob.basis_of) sketches only the shards it adds.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from .jobs import DatasetRef, IndexSettings, ModelRef
from .method import Method
from .settings import Settings

__all__ = [
    "LEAKAGE_CANDIDATES",
    "TRUSTED_RECALL",
    "IndexEntry",
    "IndexShard",
    "basis_path",
    "default_candidates",
    "index_dir",
    "inputs_path",
    "shard_path",
]
LEAKAGE_CANDIDATES = 16  # leakage through an index: records per test point (and image re-alignment) confirmed
TRUSTED_RECALL = 0.9  # an index is used by default (a request that names no `candidates`) from this recall up


def default_candidates(size: int) -> int:
    """Candidates per test point and end of the ranking that a two-stage request re-scores unless it says:
    max(1,000, 0.1% of the training set) (the recall target it was measured against: bench.index)."""
    return max(1000, -(-size // 1000))


class IndexShard(BaseModel):
    """One shard's sketches."""

    sha256: str = Field(description="the shard file's sha256 (its sketches are named by it and the basis)")
    records: int
    bytes: int = Field(description="the shard's index files (sketches, and input embedding where there is one)")
    seconds: float = Field(description="time it took to sketch and index (0: adopted from an earlier build)")


class IndexEntry(BaseModel):
    """What a finished index holds (the catalog entry)."""

    id: str
    model: ModelRef
    dataset: DatasetRef
    method: Method = Field(description="the method it sketches for (its curvature splits the sketch)")
    settings: IndexSettings
    dtype: str
    basis: str = Field(description="the sketch basis' identity (shared with the dataset's earlier versions)")
    basis_of: DatasetRef = Field(description="the dataset version the basis was made for (this one, or an earlier)")
    parameters: list[str] = Field(description="the perturbed parameters whose gradients are sketched")
    exact: int = Field(description="sketch dimensions that are exact coordinates on the curvature's eigenvectors")
    records: int
    bytes: int = Field(description="the index files' size on disk")
    bytes_per_record: float
    search: Literal["flat", "pq"] = Field(
        description="exact inner products over float16 codes, or (shards over 65,536 records) over 4-bit "
        "product-quantization codes (worker/search.py)"
    )
    shards: list[IndexShard]
    build_s: float = Field(description="compute seconds the build took, over its parts (sketching and indexing)")
    recall: float | None = Field(
        description="measured at build: the share of the default method's top-10 (each end) that the sketch puts "
        "among its top max(1,000, 0.1%) candidates, on probe queries against a sample of the training set"
    )
    recall_method: str
    created: datetime

    @staticmethod
    def key(settings: Settings, id: str) -> str:
        return settings.key("index", id)

    @staticmethod
    def catalog(settings: Settings) -> str:
        return settings.key("indexes")

    @staticmethod
    def orphans(settings: Settings) -> str:
        """The bases deleted indexes used, by deletion time: the workers free their unused files."""
        return settings.key("index-orphans")


def index_dir(settings: Settings, basis: str) -> Path:
    return settings.score_dir / "indexes" / basis


def shard_path(settings: Settings, basis: str, sha256: str) -> Path:
    return index_dir(settings, basis) / f"{sha256[:32]}.faiss"


def basis_path(settings: Settings, basis: str) -> Path:
    return index_dir(settings, basis) / "basis.safetensors"


def inputs_path(settings: Settings, basis: str, sha256: str) -> Path:
    return index_dir(settings, basis) / f"{sha256[:32]}.inputs.faiss"


def embedding_path(settings: Settings, basis: str) -> Path:
    return index_dir(settings, basis) / "inputs.safetensors"
