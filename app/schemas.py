"""The public contract, shared by the API and the worker: requests, responses and job payloads.

Pure pydantic. The API enqueues `worker.jobs.<name>` with `AttributionJob.model_dump(mode="json")`;
the worker validates it back with `AttributionJob.model_validate`. Nothing is pickled.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["queued", "running", "finished", "failed", "canceled"]


class MethodSettings(BaseModel):
    """Forward-INF settings (the engine's MirrorConfig); unset fields take the preset's, then the
    model's defaults. See docs/benchmarks.md for the evidence behind the presets."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["attribution", "leakage", "mislabeled"] | None = Field(None, description="named, measured setting")
    optimizer: Literal["sgd", "adam", "signsgd"] | None = None
    lr: Annotated[float, Field(gt=0, le=100)] | None = None
    steps: Annotated[int, Field(ge=1, le=20)] | None = None
    direction: Literal["ascent", "descent"] | None = Field(None, description="ascent = unlearn the test point")
    mode: Literal["finite", "linear"] | None = Field(
        None, description="finite = take the step; linear = exact first order"
    )
    params: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, max_length=32, description="name globs of the parameters to perturb"
    )
    score: Literal["signed", "abs", "match"] | None = None
    group: bool | None = Field(None, description="one step on the mean loss of all test points, one score row")
    safeguard: Literal["normalize", "none"] | None = None
    precondition: Literal["auto", "none", "diag", "hessian"] | None = Field(
        None, description="step along H^-1 g: linear scores become influence-function scores"
    )
    damping: Annotated[float, Field(ge=0, le=1e6)] | None = None


class InlineTest(BaseModel):
    """Test points given inline: one array per example, matching the model's input spec."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(min_length=1, description="one nested array (or token list) per test point")
    targets: list[float | int] | list[list[float | int]] | None = Field(
        None, description="class labels, regression targets, or (causal LM) a 0/1 target-token mask per point"
    )


class DatasetTest(BaseModel):
    """Test points given as records of a registered dataset (by record id or index)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    records: list[str] | None = None
    indices: list[Annotated[int, Field(ge=0)]] | None = None


class AttributionCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "digits-mlp",
                    "dataset": "digits-train",
                    "test": {"dataset": "digits-test", "indices": [0, 1]},
                    "top_k": 5,
                }
            ]
        },
    )

    model: str = Field(description="registered model id")
    dataset: str = Field(description="registered training dataset id")
    test: InlineTest | DatasetTest
    method: MethodSettings = MethodSettings()
    top_k: Annotated[int, Field(ge=1)] = 10


class Progress(BaseModel):
    done: int = 0
    total: int | None = None
    unit: str = "batches"
    eta_s: float | None = None


class Timing(BaseModel):
    load_s: float = 0.0
    mirror_s: float = 0.0
    sweep_s: float = 0.0
    store_s: float = 0.0


class Influence(BaseModel):
    record_id: str
    index: int
    score: float


class RowAttribution(BaseModel):
    row: int
    test_loss: float
    memorized: bool = Field(description="loss below the memorised-point threshold (see the engine docs)")
    proponents: list[Influence] = Field(description="highest scores: training points that support the prediction")
    opponents: list[Influence] = Field(description="lowest scores: training points that work against it")


class AttributionResult(BaseModel):
    shape: tuple[int, int]
    method: dict[str, Any] = Field(description="the settings that were used, fully resolved")
    rows: list[RowAttribution]
    timing: Timing = Timing()


class AttributionPublic(BaseModel):
    id: str
    status: Status
    model: str
    dataset: str
    progress: Progress = Progress()
    timing: Timing | None = None
    result: AttributionResult | None = None
    error: str | None = None
    cached: bool = False
    links: dict[str, str] = {}


class AttributionJob(BaseModel):
    """The payload of worker.jobs.attribute (request resolved against the registry)."""

    key: str
    model: str
    model_digest: str
    dataset: str
    dataset_digest: str
    test: InlineTest | DatasetTest
    method: dict[str, Any]
    top_k: int


class ModelPublic(BaseModel):
    id: str
    version: str
    description: str
    task: str
    architecture: str
    input: dict[str, Any]
    method_defaults: dict[str, Any]
    digest: str


class DatasetPublic(BaseModel):
    id: str
    version: str
    description: str
    size: int
    shards: int
    input: dict[str, Any]
    trained: list[str]
    digest: str


class Problem(BaseModel):
    """application/problem+json (RFC 9457)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: Literal["ok", "not ready"]
    redis: bool | None = None
    workers: int | None = None
    created_at: datetime | None = None
