"""The way back, from worker to API: what a part hands its reduce, the result the reduce stores, and the
Redis names both processes read and write, each named by the type that stores it.

    SweepPart       a sweep part's summary (its RQ return value, JSON): its score block, the mirrored step's
                    figures per row, each row's best and worst records of the part
    LeakagePart     a part of a leakage analysis through an index: each row's candidates, confirmed
    IndexPart       a part of an index build: its shards' sketches
    Stored          the stored result, by kind: StoredAttribution or StoredAnalysis (at `result_key`, JSON,
                    with the scores' TTL); the API serves views of it, its scores and its report
    PartProgress    one part's progress in a fan-out's hash (`PartProgress.key`); the API sums the parts
    channel         where a job's end is published (app/events.py)
    heartbeat       a worker's live record (worker/__main__.py), which /readyz and /metrics read

A part's summary is read by the reduce only (on any worker); a stored result by every API process. A change
to what is stored changes what an older API reads: bump contract.jobs.ENGINE_VERSION with it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter

from .indexes import IndexShard
from .kinds import AnalysisResult, Job
from .method import family_of
from .schemas import Execution, IndexUse, Progress, RowAttribution, Timing
from .scores import Block
from .settings import Settings

__all__ = [
    "STORED",
    "Fitted",
    "IndexPart",
    "LeakagePart",
    "PartProgress",
    "Stored",
    "StoredAnalysis",
    "StoredAttribution",
    "SweepPart",
    "channel",
    "heartbeat",
    "result_key",
]


# -- parts ------------------------------------------------------------------------------------------------
class Prediction(BaseModel):
    """A classification test point's true label and what the model predicts (contract.schemas.TestPoint)."""

    label: int
    predicted: int
    p_predicted: float


class Ends(BaseModel):
    """Each row's k best (or worst) scores of a part and their training records (global indices)."""

    values: list[list[float]]
    records: list[list[int]]


class Fitted(BaseModel):
    """A mislabeled analysis' calibration, fitted on its reference set (the engine's Calibration)."""

    temperature: float
    bias: tuple[float, ...]
    confusion: tuple[tuple[float, ...], ...] = ()


class Calibrated(BaseModel):
    """Mislabeled: the part's training records' class log-probabilities under `calibration` (one row per class)."""

    calibration: Fitted
    block: Block


class SweepPart(BaseModel):
    block: Block = Field(description="the part's (rows, width) scores in the score store")
    rows: int
    execution: Execution
    test_loss: list[float]
    self_score: list[float]
    memorized: list[bool]
    predictions: list[Prediction] | None = None
    batches: int
    timing: Timing
    high: Ends | None = Field(None, description="attribution: each row's best records of the part")
    low: Ends | None = None
    calibrated: Calibrated | None = None
    columns: list[int] | None = Field(None, description="two-stage: the candidates' records, the block's columns")
    index: IndexUse | None = None


class Candidate(BaseModel):
    index: int
    distance: float
    similarity: float


class Confirmed(BaseModel):
    """A leakage row's closest candidates; for a calibration record, its distance to itself and to its
    nearest other candidate (inf where it has none)."""

    matches: list[Candidate]
    itself: float | None = None
    nearest_other: float | None = None


class LeakagePart(BaseModel):
    first: int
    rows: list[Confirmed]
    rescored: int
    execution: Execution


class IndexPart(BaseModel):
    shards: list[IndexShard]


# -- the stored result ----------------------------------------------------------------------------------
class _Stored(BaseModel):
    job: Job
    execution: Execution
    progress: Progress
    blocks: list[Block] = Field(description="the score matrix's column blocks (contract/scores.py)")
    shape: tuple[int, int] = Field(description="(test points, training records)")
    timing: Timing
    columns: list[int] | None = Field(None, description="the training record of each column, where not all are")


class StoredAttribution(_Stored):
    rows: list[RowAttribution] = Field(description="each row's top proponents and opponents (max_top_k)")
    index: IndexUse | None = None


class StoredAnalysis(_Stored):
    analysis: AnalysisResult


def _family(value: Any) -> str:
    job = value["job"] if isinstance(value, dict) else value.job
    return family_of(job["kind"] if isinstance(job, dict) else job.kind)


Stored = Annotated[
    Annotated[StoredAttribution, Tag("attribution")] | Annotated[StoredAnalysis, Tag("analysis")],
    Discriminator(_family),
]
STORED: TypeAdapter[Stored] = TypeAdapter(Stored)


def result_key(settings: Settings, key: str) -> str:
    """Where computation `key`'s Stored result lives (JSON, with the scores' TTL)."""
    return settings.key("result", key)


# -- progress and events ----------------------------------------------------------------------------------
class PartProgress(BaseModel):
    done: int
    total: int | None
    eta_s: float | None

    @staticmethod
    def key(settings: Settings, key: str) -> str:
        """The fan-out's hash: one field per part (its first shard)."""
        return settings.key("progress", key)


def channel(settings: Settings) -> str:
    """Where a job's key is published once its end is stored; `drop:<name>` there: a result was deleted."""
    return settings.key("events")


def heartbeat(settings: Settings, worker: str) -> str:
    """A worker's live record (a hash that expires unless its worker refreshes it); `*` matches them all."""
    return settings.key("worker", worker)
