"""Job payloads: a request resolved completely at the door (app/resolve.py), one typed payload per kind (their
union, `Job`, is contract/kinds.py's), enqueued as JSON and run exactly as it is by the worker: as one job
(`JOB_FUNC`), or, for a training set of several parts (DatasetManifest.parts), as one shard job per part
(`PART_FUNC`, id `part_id`) and a reduce job (`REDUCE_FUNC`, id `key`) that RQ runs once every part has ended.

The payload *is* the request's identity: `job.key` (the RQ job id and the cache key of its result) hashes
all of it: the resolved method, every digest the result depends on (model, training set, the records used
as test points, reference or audit set), inline test data, the compute dtype and ENGINE_VERSION. Nothing
that does not change the result is in it (top_k is a view of the stored result).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .method import Method, whole

__all__ = [
    "ENGINE_VERSION",
    "JOB_FUNC",
    "AttributionJob",
    "DatasetRef",
    "IndexJob",
    "IndexSettings",
    "InlinePoints",
    "JobBase",
    "LeakageJob",
    "MemorizationJob",
    "MislabeledJob",
    "ModelRef",
    "Points",
    "RecordPoints",
    "INDEX_FUNCS",
    "LEAKAGE_FUNCS",
    "PART_FUNC",
    "TWO_STAGE_FUNC",
    "REDUCE_FUNC",
    "PROBE_FUNC",
    "affinity_queue",
    "queue_names",
    "digest",
    "echo",
    "bucket_of",
    "artifact_id",
    "part_id",
]

# Bump on any change that alters scores, base losses, curvature or an analysis' answer: cached results,
# stored base losses and curvature made by another version are then never reused (tests/test_contract.py
# fails when the engine's code changes and this does not).
ENGINE_VERSION = "2026.12.14"
HANDLE_LENGTH = 32  # hex digits of a job's id, a tenant's handle of it (app.jobs.Jobs.handle_of)
# the worker's RQ entry points, by dotted path (the API never imports them)
JOB_FUNC = "worker.jobs.run"  # a whole request in one job
PART_FUNC = "worker.jobs.run_part"  # one part of the training set: its score block and per-part summary
REDUCE_FUNC = "worker.jobs.reduce"  # merges the parts' summaries into the result
PROBE_FUNC = "worker.jobs.probe"  # registration's dry run: a staged model loaded and stepped once
INDEX_FUNCS = ("worker.index.run", "worker.index.run_part", "worker.index.reduce")  # an IndexJob's, the same way
TWO_STAGE_FUNC = "worker.index.attribute"  # an attribution with an index: always one job
Dtype = Literal["float32", "float64"]


def digest(value: Any) -> str:
    """sha256 of a JSON value's canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Frozen):
    id: str
    digest: str = Field(description="sha256 of the model's manifest (which records its weights' sha256)")


class DatasetRef(_Frozen):
    id: str
    digest: str = Field(description="sha256 of the dataset's manifest (which records each shard's sha256)")


class RecordPoints(_Frozen):
    """Records of a registered dataset, by index (record ids are resolved to indices at the door)."""

    source: Literal["records"] = "records"
    dataset: DatasetRef
    indices: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class InlinePoints(_Frozen):
    """Test points given inline (or text, encoded at the door), canonicalised to the model's dtypes."""

    source: Literal["inline"] = "inline"
    inputs: list[Any] = Field(min_length=1, description="one nested array (or token list) per test point")
    targets: list[Any] | None = None


Points = Annotated[RecordPoints | InlinePoints, Field(discriminator="source")]


def echo(points: RecordPoints | InlinePoints, record_ids: Sequence[str]) -> list[dict]:
    """Which test point each result row is (the TestPoint schema): a record of a dataset (`record_ids`:
    that dataset's), or an inline point by the digest of its canonical input and target."""
    if isinstance(points, RecordPoints):
        return [{"dataset": points.dataset.id, "index": i, "record_id": record_ids[i]} for i in points.indices]
    targets = points.targets or [None] * len(points.inputs)
    return [{"digest": digest([x, y])} for x, y in zip(points.inputs, targets, strict=True)]


def _unset(value) -> bool:  # a field added after a kind's first release leaves older identities as they were
    return value is None or value is False


class JobBase(_Frozen):
    """What every payload carries; a kind's payload adds its fields, a `kind` literal and, for an analysis,
    `points` (the rows the engine steps on: test points, a reference group or audited records)."""

    engine_version: str = ENGINE_VERSION
    model: ModelRef
    dataset: DatasetRef
    dtype: Dtype = Field(description="the compute dtype (the service's ATTR_DTYPE when it was resolved)")
    method: Method
    untrained: bool = Field(
        False, exclude_if=_unset, description="the model was not trained on the dataset, and the request said so"
    )

    @property
    def key(self) -> str:
        """The computation's identity and the key of its stored result: a hash of the whole payload."""
        return digest(self.model_dump(mode="json"))[:32]

    @property
    def functions(self) -> tuple[str, str | None, str | None]:
        """The worker's entry points for this payload: (a whole job, a part, the reduce); None: one job only."""
        return JOB_FUNC, PART_FUNC, REDUCE_FUNC


class AttributionJob(JobBase):
    kind: Literal["attribution"] = "attribution"
    test: Points
    index: str | None = Field(
        None, exclude_if=_unset, description="two-stage: the index (IndexJob.key) that finds the candidates"
    )
    candidates: int | None = Field(
        None, exclude_if=_unset, description="two-stage: candidates per test point at each end of the ranking"
    )

    @property
    def functions(self) -> tuple[str, str | None, str | None]:
        return (TWO_STAGE_FUNC, None, None) if self.index else super().functions

    @property
    def points(self) -> RecordPoints | InlinePoints:
        """The records or inline data whose rows the engine's first score rows are."""
        return self.test


LEAKAGE_FUNCS = ("worker.leakage.run", "worker.leakage.run_part", "worker.leakage.reduce")  # through an index


class LeakageJob(JobBase):
    kind: Literal["leakage"] = "leakage"
    test: Points
    calibration_records: int
    false_flag_rate: float
    index: str | None = Field(
        None, exclude_if=_unset, description="through an index (IndexJob.key): candidates by input similarity"
    )
    candidates: int | None = Field(
        None, exclude_if=_unset, description="through an index: candidates per test point (and re-alignment)"
    )

    @property
    def functions(self) -> tuple[str, str | None, str | None]:
        return LEAKAGE_FUNCS if self.index else super().functions

    @property
    def points(self) -> RecordPoints | InlinePoints:
        return self.test


RankBy = Literal["posterior", "combined", "loss", "harm"]  # the mislabeled analysis' orders


class MislabeledJob(JobBase):
    kind: Literal["mislabeled"] = "mislabeled"
    reference: RecordPoints
    rank_by: RankBy
    review_size: int | None

    @property
    def points(self) -> RecordPoints:
        return self.reference


class MemorizationJob(JobBase):
    kind: Literal["memorization"] = "memorization"
    records: RecordPoints
    neighbours: int
    calibration_records: int

    @property
    def points(self) -> RecordPoints:
        return self.records


class IndexSettings(_Frozen):
    """How an index sketches each record (worker/forward_inf/sketch.py); defaults by measurement (bench.index)."""

    dims: whole(ge=8, le=1024) = Field(
        256, description="sketch dimensions per record, stored as float16 (2 bytes each)"
    )
    rank: whole(ge=0, le=1024) = Field(
        64,
        description="of which exact coordinates on the curvature's top eigenvectors (the rest: a whitened "
        "random sketch of what they leave out)",
    )


class IndexJob(JobBase):
    """Build the training-side index of (model, dataset) for `method` (the default attribution method it
    sketches for): one part per group of shards, then the catalog entry (worker/index.py)."""

    kind: Literal["index"] = "index"
    settings: IndexSettings
    basis_of: DatasetRef | None = Field(
        None, description="an earlier version of the dataset whose index basis (and shards' sketches) is adopted"
    )

    @property
    def functions(self) -> tuple[str, str | None, str | None]:
        return INDEX_FUNCS

    @property
    def basis(self) -> str:
        """The sketch basis' identity: the model, the dataset version it was first made for, the method,
        the settings, the dtype (and ENGINE_VERSION): records sketched in it are comparable."""
        first = self.basis_of or self.dataset
        return artifact_id("index-basis", self.model.digest, first.digest, self.method.model_dump_json(),
                           self.settings.model_dump_json(), self.dtype)  # fmt: skip


def artifact_id(*parts: str | int) -> str:
    """Identity of a stored intermediate (base losses, curvature) made from `parts` (digests, shard,
    dtype, settings) by this ENGINE_VERSION."""
    return hashlib.sha256(json.dumps([ENGINE_VERSION, *parts]).encode()).hexdigest()[:32]


def part_id(key: str, first_shard: int) -> str:
    """The RQ job id of the shard job of computation `key` whose part starts at shard `first_shard`."""
    return f"{key}-p{first_shard}"


def affinity_queue(queue: str, bucket: int, long: bool = False) -> str:
    """The name of affinity queue `bucket` (shard jobs) beside the main `queue` (whole jobs, reduces); `long`:
    its twin for work estimated past long_job_s, taken only when no other work waits (contract/cost.py)."""
    return f"{queue}.long.{bucket}" if long else f"{queue}.{bucket}"


def queue_names(queue: str, buckets: int) -> list[str]:
    """Every queue a worker takes work from: the main one, the affinity queues, their long twins."""
    return [queue] + [affinity_queue(queue, b, long) for long in (False, True) for b in range(buckets)]


def bucket_of(dataset_digest: str, first_shard: int, buckets: int) -> int:
    """The affinity bucket of a part: the same shard of the same dataset always lands in the same one,
    consecutive parts in different ones (so they spread over the workers)."""
    return (int(dataset_digest[:8], 16) + first_shard) % buckets
