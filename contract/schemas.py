"""The public schemas: requests, job views, results, registry views and problems (pure pydantic).

    JobCreate  -> AttributionCreate, LeakageCreate, MislabeledCreate, MemorizationCreate
    JobPublic  -> AttributionPublic, AnalysisPublic        (status, progress, `method`, `execution`, result)

The types that depend on the set of kinds (AnalysisPublic, the analyses' result union, the job listing) are
contract/kinds.py's, built from its registry.

A request's `method` (MethodSettings) is resolved at the door into the job's `method` (Method); what the
engine then actually ran (precondition and parameters as it resolved them, curvature, dtype, engine
version, fallbacks) is the finished job's `execution`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .indexes import TRUSTED_RECALL, IndexEntry
from .jobs import IndexSettings, RankBy
from .method import Method, MethodDefaults, MethodSettings, whole
from .registry import ID, REGISTERABLE, InputSpec

Status = Literal["queued", "running", "finished", "failed", "canceled"]
ENDED: tuple[Status, ...] = ("finished", "failed", "canceled")  # a job in these states changes no more
Number = Annotated[float, Field(strict=True)]  # a JSON number (an integer too), never a boolean or a string


class InlineTest(BaseModel):
    """Test points given inline: one array per example, matching the model's input spec."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(min_length=1, description="one nested array (or token list) per test point")
    targets: list[Number] | list[list[Number]] | None = Field(
        None, description="class labels, regression targets, or (causal LM) a 0/1 target-token mask per point"
    )


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=4096)
    completion: str = Field(min_length=1, max_length=4096, description="the text whose likelihood is attributed")


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(min_length=1, max_length=64, examples=["system", "user", "assistant"])
    content: str = Field(max_length=4096)


class ChatCompletion(BaseModel):
    """A conversation, rendered with the model's chat template (its tokenizer_config.json) as the prompt,
    and the assistant reply whose likelihood is attributed."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatTurn] = Field(min_length=1, max_length=64)
    completion: str = Field(min_length=1, max_length=4096, description="the assistant's reply")


class TextTest(BaseModel):
    """Test points as text, for a causal LM that takes text (UTF-8 bytes or its own tokenizer): the loss is
    the negative log-likelihood of each completion's tokens given its prompt (or rendered conversation)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Completion | ChatCompletion] = Field(min_length=1)


class DatasetTest(BaseModel):
    """Test points given as records of a registered dataset (by record id or index)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    records: list[str] | None = None
    indices: list[whole(ge=0)] | None = None


class Webhook(BaseModel):
    """Where to POST the job's final view (as GET returns it) once it ends: finished, failed or canceled.
    Signed (X-Attribution-Signature: contract/webhooks.py), retried on failure; not part of the request's
    identity."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        pattern=r"^https?://[^\s/?#]+[^\x00-\x20\x7f]*$",
        max_length=2048,
        description="on a host (and port) ATTR_WEBHOOK_HOSTS allows; no spaces or control characters",
    )
    secret: str = Field(min_length=16, max_length=256, description="the key of the signature's HMAC-SHA256")


class JobCreate(BaseModel):
    """What every request names: a registered model, the training set it was trained on, and settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="registered model id")
    dataset: str = Field(description="registered training dataset id")
    untrained: Annotated[bool, Field(strict=True)] = Field(
        False,
        description="the model was not trained on this dataset (it is not in the dataset's `trained` list) and that "
        "is intended, e.g. to score a candidate training set; otherwise such a pair is a 422",
    )
    method: MethodSettings = Field(default_factory=MethodSettings)
    webhook: Webhook | None = Field(None, description="optional: be called when the job ends, instead of polling")


class AttributionCreate(JobCreate):
    model_config = ConfigDict(
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

    test: InlineTest | DatasetTest | TextTest
    top_k: whole(ge=1) = 10
    candidates: whole(ge=0) | None = Field(
        None,
        description="two-stage: re-score only this many candidates per test point at each end of the ranking, "
        "found by the model's and dataset's index (POST /v1/indexes); 0: the full sweep. Default: with an index "
        f"built for the request's method whose recall measured at build is at least {TRUSTED_RECALL}, max(1,000, "
        "0.1% of the training set); else the full sweep",
    )


class Progress(BaseModel):
    done: int = 0
    total: int | None = None
    unit: str = "batches"
    eta_s: float | None = None


class Admission(BaseModel):
    """What the door estimated and chose (contract/cost.py; README, "Admission by cost")."""

    estimate_s: float = Field(description="the work in worker-seconds, from the workers' measured rate on this model")
    long: bool = Field(description="waits on the long queues, taken only when no other work waits")


class Timing(BaseModel):
    load_s: float = 0.0
    mirror_s: float = 0.0
    search_s: float | None = Field(None, description="two-stage: the index's search for the candidates")
    sweep_s: float = 0.0
    store_s: float = 0.0


class Influence(BaseModel):
    record_id: str
    index: int
    score: float


class TestPoint(BaseModel):
    """Which test point a result row is: a record of a registered dataset, or inline data by digest."""

    __test__ = False  # not a pytest test class, whatever its name
    dataset: str | None = Field(None, description="the registered dataset the point is a record of")
    index: int | None = None
    record_id: str | None = None
    digest: str | None = Field(None, description="an inline point: sha256 of [input, target] as canonical JSON")
    label: int | None = Field(None, description="classification: the point's true label")
    predicted: int | None = Field(None, description="classification: the label the model predicts for it")
    p_predicted: float | None = Field(None, description="the model's probability of that label (softmax)")


class RowAttribution(BaseModel):
    row: int
    test: TestPoint
    test_loss: float
    memorized: bool = Field(
        description="a training record whose loss is below the memorised-point threshold (see the engine docs); "
        "false for every point outside the training set"
    )
    proponents: list[Influence] = Field(description="highest scores: training points that support the prediction")
    opponents: list[Influence] = Field(description="lowest scores: training points that work against it")


class IndexUse(BaseModel):
    """What a two-stage answer ran: the index's candidates, re-scored exactly (the other records unscored)."""

    index: str = Field(description="the index that found the candidates")
    candidates: int = Field(description="candidates per test point at each end of the ranking")
    rescored: int = Field(description="training records re-scored (the union of every test point's candidates)")
    recall: float | None = Field(description="the index's recall, measured when it was built (IndexPublic)")


class AttributionResult(BaseModel):
    shape: tuple[int, int]
    rows: list[RowAttribution]
    timing: Timing = Timing()
    index: IndexUse | None = Field(None, description="two-stage: the index and candidates; null: the full sweep")


class ScoresPage(BaseModel):
    """A window of a result's float32 score matrix (rows: test points; columns: training records)."""

    id: str
    shape: list[int] = Field(min_length=2, max_length=2, description="the whole matrix's shape")
    rows: list[int] = Field(min_length=2, max_length=2, description="this window's rows [from, to)")
    columns: list[int] = Field(min_length=2, max_length=2, description="this window's columns [from, to)")
    records: list[int] | None = Field(
        None, description="two-stage results: the training record of each column (only candidates were scored)"
    )
    scores: list[list[float]]
    next: str | None = Field(None, description="the URL of the next page of columns; null on the last")


class CurvatureInfo(BaseModel):
    kind: Literal["hessian", "lowrank", "diag", "kfac", "ekfac"]
    damping: float
    samples: int = Field(description="training points the curvature was estimated from")
    clipped_eigenvalues: int = Field(description="negative eigenvalues set to 0 before damping (non-convex model)")
    rank: int | None = Field(None, description="lowrank: the Hessian's eigenpairs kept (the rest taken as 0)")


class Execution(BaseModel):
    """What the engine actually ran for a finished job."""

    method: Method = Field(description="the job's method with precondition and params as the engine resolved them")
    parameters: list[str] = Field(description="names of the perturbed parameters")
    parameter_count: int
    curvature: CurvatureInfo | None
    stacking: str = Field(description="how the test points met a batch: vmap, loop, layers, or single")
    dtype: str
    device: str
    engine_version: str
    notes: list[str] = Field(description="every choice or repair the engine made on its own, in words")


class JobPublic(BaseModel):
    id: str
    status: Status
    model: str
    dataset: str
    method: Method | None = Field(
        None, description="the resolved settings: request > preset > the model's defaults > the engine's"
    )
    progress: Progress = Progress()
    timing: Timing | None = None
    execution: Execution | None = Field(None, description="what ran, once finished")
    error: str | None = Field(None, description="why the job failed (the exception's message)")
    admission: Admission | None = Field(
        None, description="while queued or running: its estimate and queue; null where its model was never measured"
    )
    cached: bool = Field(False, description="answered from an earlier computation of the same request")
    links: dict[str, str] = {}


class AttributionPublic(JobPublic):
    result: AttributionResult | None = None


class IndexCreate(BaseModel):
    """Build the training-side index of a model and its training set, for the model's default attribution
    method (its curvature splits the sketch): built once on the fleet, then two-stage requests take their
    candidates from it."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "digits-mlp", "dataset": "digits-train"}]}
    )

    model: str = Field(description="registered model id")
    dataset: str = Field(description="registered training dataset id")
    untrained: Annotated[bool, Field(strict=True)] = Field(
        False, description="as a request's: the model was not trained on this dataset, and that is intended"
    )
    method: MethodSettings = Field(
        default_factory=MethodSettings,
        description="the attribution method it sketches for (resolved as an attribution's: request > preset > the "
        "model's defaults > the engine's); two-stage requests of this method use it by default",
    )
    settings: IndexSettings = Field(default_factory=IndexSettings)


class IndexPublic(BaseModel):
    id: str
    status: Status
    model: str
    dataset: str
    progress: Progress = Progress()
    error: str | None = None
    index: IndexEntry | None = Field(None, description="what it holds, once finished")
    links: dict[str, str] = {}


class IndexPage(BaseModel):
    items: list[IndexPublic]


# -- analyses ------------------------------------------------------------------------------------------
class LeakageCreate(JobCreate):
    """Which test points are (likely) present in the training set, as exact copies or near duplicates."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "digits-audit-mlp",
                    "dataset": "digits-audit-train",
                    "test": {"dataset": "digits-audit-test", "indices": [0, 1, 2, 100]},
                }
            ]
        }
    )
    test: InlineTest | DatasetTest | TextTest
    calibration_records: whole(ge=16, le=1024) = Field(
        128, description="training records used as queries to calibrate the decision threshold"
    )
    false_flag_rate: Annotated[float, Field(ge=0.001, le=0.2)] = Field(
        0.005,
        description="near duplicates: the share of clean test points the similarity threshold may flag (measured "
        "on training records against the rest)",
    )
    candidates: whole(ge=0, le=1000) | None = Field(
        None,
        description="through the model's and dataset's index (POST /v1/indexes): the records most similar to each "
        "test point (and to each small re-alignment of an image) that are confirmed; up to "
        "ATTR_MAX_INDEX_TEST_POINTS test points. 0: the full analysis. Default: 16 where an index exists and the "
        "model's inputs are float vectors or text; else the full analysis (up to ATTR_MAX_TEST_POINTS)",
    )


class MislabeledCreate(JobCreate):
    """Training records ranked by how likely their label is wrong."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "digits-audit-mlp",
                    "dataset": "digits-audit-train",
                    "reference": {"dataset": "digits-audit-test", "indices": list(range(40, 400))},
                }
            ]
        }
    )
    reference: DatasetTest = Field(description="clean, correctly labelled records (e.g. a vetted held-out set)")
    rank_by: RankBy = Field(
        "posterior",
        description="posterior: p_wrong, the probability that the label is wrong given the record's loss "
        "under the calibration fitted on the reference set (a temperature and class offsets) and its harm; "
        "loss: the record's own training loss; harm: how much a step on the reference set raises the record's "
        "loss (Forward-INF group mode, cosine score); combined: the sum of the loss and harm ranks. "
        "Default by measurement (docs/benchmarks.md).",
    )
    review_size: whole(ge=1, le=10_000) | None = Field(
        None, description="length of the review list; default: the expected number of wrong labels (sum of p_wrong)"
    )


class MemorizationCreate(JobCreate):
    """How much the model relies on each requested training record for its own prediction."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "digits-audit-mlp",
                    "dataset": "digits-audit-train",
                    "records": {"dataset": "digits-audit-train", "indices": [0, 1, 2]},
                }
            ]
        }
    )
    records: DatasetTest = Field(description="records of the training dataset to audit (ids or indices)")
    neighbours: whole(ge=1, le=100) = Field(10, description="other records that may explain it")
    calibration_records: whole(ge=16, le=1024) = Field(
        128, description="training records whose reliance sets the outlier threshold"
    )


class Match(BaseModel):
    record_id: str
    index: int
    distance: float = Field(description="relative difference of the two records' responses; 0 = identical")
    similarity: float | None = Field(
        None,
        description="input-space similarity: the largest Pearson correlation of the two inputs over small "
        "re-alignments (images: shifts and a zoom); 1 = the same up to brightness and contrast; null where the "
        "model's inputs are token ids",
    )


class LeakageRow(BaseModel):
    row: int
    test: TestPoint
    leaked: bool
    match: Literal["copy", "near-duplicate"] | None = Field(
        description="copy: the best match responds to the mirrored step as the test point does (an exact "
        "copy); near-duplicate: its input is more similar than the calibrated threshold; null: not found"
    )
    best: Match
    evidence: list[Match] = Field(description="the 5 closest training records, copies first, then by similarity")


class LeakageCalibration(BaseModel):
    threshold: float = Field(description="a test point is a copy when its best distance is at most this")
    method: str
    records: int = Field(description="training records used as calibration queries")
    duplicate_distance: float = Field(description="largest distance of a record to itself (numerical noise)")
    chance_distance: float = Field(description="1st percentile of a record's distance to its nearest other record")
    expected_recall: float = Field(description="share of calibration records found as their own copy")
    similarity_threshold: float | None = Field(
        None, description="a test point is a near duplicate when its best similarity is above this (null: no input)"
    )
    similarity_method: str | None = None
    near_duplicate_recall: dict[str, float] = Field(
        {},
        description="per kind of change, the share of the calibration records' changed versions whose similarity "
        "to their original is above the threshold",
    )
    expected_false_flag_rate: float = Field(
        description="the copy rule's share of calibration records (without a copy in the set) flagged against the "
        "others, plus the near rule's chance that a new clean query exceeds the threshold, (k + 1) / (n + 1) for "
        "the (k + 1)-th largest of n calibration values"
    )


class LeakageResult(BaseModel):
    kind: Literal["leakage"] = "leakage"
    summary: str
    leaked: int
    rows: list[LeakageRow]
    calibration: LeakageCalibration
    index: IndexUse | None = Field(
        None, description="through an index: candidates per test point, found by input similarity, confirmed exactly"
    )


class Suspect(BaseModel):
    rank: int
    record_id: str
    index: int
    label: int | None
    predicted: int = Field(description="the label the model believes: the most probable after calibration")
    p_predicted: float = Field(description="its probability under the fitted calibration")
    loss: float = Field(description="the record's training loss under the model")
    p_label: float = Field(description="probability the model gives the recorded label (exp(-loss))")
    harm: float = Field(description="how much the reference set's loss rises with this record (Forward-INF)")
    p_wrong: float = Field(
        description="probability that the recorded label is wrong (loss under the fitted calibration, and harm)"
    )


class ClassSummary(BaseModel):
    label: int
    records: int
    in_review: int
    mean_loss: float
    mean_harm: float


class MislabeledResult(BaseModel):
    kind: Literal["mislabeled"] = "mislabeled"
    summary: str
    rank_by: str
    review_size: int
    expected_wrong: float = Field(description="sum over all records of p_wrong")
    expected_precision: float = Field(description="share of the review list expected to be mislabelled")
    temperature: float = Field(description="the temperature that fits the model's probabilities to the reference set")
    class_bias: list[float] = Field(
        description="per class, the logit offset fitted with the temperature (bias-corrected temperature scaling): "
        "> 0 where the model predicts that class less often than the reference set's labels say"
    )
    label_noise: float | None = Field(
        description="the rate of uniformly wrong labels that best explains the training labels under the calibrated "
        "model, where it explains them better than none (the model did not memorise them); null: the model's own "
        "1 - p(label) is the prior"
    )
    class_noise: bool = Field(
        False,
        description="where no uniform rate explains the labels: class-dependent label noise explains them better "
        "than none (the model did not memorise them and leans between some classes); the prior then takes out "
        "that lean as the model shows it on the reference set",
    )
    precision_method: str
    review: list[Suspect]
    classes: list[ClassSummary]


class MemorizedRecord(BaseModel):
    rank: int
    record_id: str
    index: int
    self_influence: float = Field(description="the record's influence on its own loss (with its exact copies)")
    neighbour_support: float = Field(description="summed influence of its top supporting other records")
    reliance: float = Field(description="self / (self + neighbours): 1 = only the record itself explains it")
    copies: list[str] = Field(description="other training records with identical responses (exact duplicates)")
    neighbours: list[Influence]
    outlier: bool
    flags: list[Literal["outlier", "duplicated"]]


class MemorizationResult(BaseModel):
    kind: Literal["memorization"] = "memorization"
    summary: str
    threshold: float = Field(description="reliance above which a record is an outlier")
    threshold_method: str
    records: list[MemorizedRecord]


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


# -- registration over HTTP (admin scope): files are PUT one by one, then the entry is POSTed -----------
class UploadedFile(BaseModel):
    name: str
    size: int
    sha256: str = Field(description="computed by the server")


class ModelRegistration(BaseModel):
    """A model whose files were uploaded (PUT .../files/NAME): model.safetensors (or the family's weights
    file) with config.json and tokenizer files for transformers, adapter_config.json for peft,
    config.json + scheduler_config.json for diffusers. Unset fields come from the family's files (input
    spec and diffusion schedule) or, for an adapter, from its base."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["classification", "regression", "causal-lm", "diffusion"] | None = None
    architecture: str = Field(
        pattern=REGISTERABLE,
        examples=["transformers:causal-lm", "peft:lora", "builtin:mlp"],
        description="a built-in architecture or a library family; operator code (python:...) is never registered "
        "over HTTP",
    )
    base: str | None = Field(None, pattern=ID, description="peft:lora: the registered base model")
    weights: str | None = Field(None, description="the weights file, if not the family's usual name")
    params: dict[str, Any] = {}
    task_params: dict[str, Any] | None = None
    input: InputSpec | None = None
    method: MethodDefaults | None = None
    description: str = Field("", max_length=2000)
    dry_run: bool = Field(False, description="load and step it on a worker, report, but do not register it")


class Probe(BaseModel):
    """What a worker made of the model: loaded as a request would load it and stepped once on a made-up
    example of its input spec."""

    parameter_count: int
    perturbed: list[str] = Field(description="the parameters its default method perturbs")
    perturbed_count: int
    example_loss: float


class ModelRegistered(BaseModel):
    model: ModelPublic
    probe: Probe
    registered: bool = Field(description="false for a dry run: the upload stays staged")


class TextCorpus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(
        description='an uploaded .jsonl: one {"text"} or {"prompt", "completion"} per line, optional "id"'
    )
    model: str = Field(pattern=ID, description="the registered model whose tokenizer encodes it")
    max_length: int = Field(ge=2, le=1 << 16, description="tokens per record; longer texts lose their end")


class DatasetRegistration(BaseModel):
    """A dataset whose shards were uploaded: .safetensors ("inputs"[, "targets"]) or .npy (with
    NAME.targets.npy), optionally records.json (ids); or a JSONL text corpus tokenized here."""

    model_config = ConfigDict(extra="forbid")

    input: InputSpec | None = Field(None, description="required unless `text` (then the model's)")
    shards: list[str] = Field([], description="uploaded shard files, in order")
    text: TextCorpus | None = None
    trained: list[str] = []
    description: str = Field("", max_length=2000)
    dry_run: bool = False
    index: list[str] = Field(
        [],
        max_length=16,
        description="models whose index on it (their default attribution method) is built once it is registered "
        "(POST /v1/indexes for each)",
    )


class DatasetRegistered(BaseModel):
    dataset: DatasetPublic
    registered: bool
    indexes: list[IndexPublic] = Field([], description="the index builds `index` asked for")


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
