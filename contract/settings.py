"""Every knob of the service, in one pydantic-settings class, read from ATTR_* environment variables
(and REDIS_URL). The API and the worker each build one `Settings()` at start; tests pass their own.
What a setting decides is said once, here: e.g. `dtype` is resolved by the API into each job (part of its
identity), so the worker computes in the job's dtype whatever its own environment says."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "development-only-secret"


class Extensions(BaseSettings):
    """The one setting the contract reads as it is imported: the kinds it builds its types from."""

    model_config = SettingsConfigDict(env_prefix="ATTR_", extra="ignore")

    analyses: list[str] = Field(
        [],
        description="modules of an operator's own analysis kinds (JSON list), imported by every process that "
        "imports the contract (API, worker, client); each registers its AnalysisSpec (contract/kinds.py)",
    )


class Settings(Extensions):
    model_config = SettingsConfigDict(env_prefix="ATTR_", extra="ignore", populate_by_name=True)

    environment: Literal["development", "production"] = "development"
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "ATTR_REDIS_URL"))
    redis_timeout_s: float = Field(1.0, description="socket connect/read timeout: Redis down -> 503 fast")
    redis_connections: int = Field(64, description="the API's async pool; requests beyond it wait for one")
    namespace: str = Field("fi", description="prefix of every key this service writes (RQ's own: rq:)")
    queue: str = "attributions"
    registry_dir: Path = Path("var/registry")
    python_architectures: list[str] = Field(
        [],
        description="modules whose factories an operator's manifest may name as python:module:factory (JSON list); "
        "registration over HTTP never can",
    )

    # tenants and keys (app/auth.py)
    api_keys_file: Path | None = Field(
        None, description="TOML file of API keys (python -m app.keys); unset in development: one local user"
    )
    secret: str = Field(
        PLACEHOLDER_SECRET, description="HMAC key of job handles (unguessable ids); required outside development"
    )
    local_tenant: str = Field("local", description="the tenant of every request when there is no keys file")
    docs: bool = Field(True, description="serve /docs, /redoc and /openapi.json (no key needed); false hides them")

    # quotas (429 / 503 with Retry-After)
    submit_rate_per_minute: int = Field(
        120, description="requests for new work a tenant may submit per minute (answers from the cache not counted)"
    )
    max_active_jobs_per_tenant: int = Field(16, description="computations a tenant may have queued or running")
    max_queued_jobs: int = Field(1000, description="jobs waiting in the queue before new work is refused")
    retry_after_s: int = Field(5, description="Retry-After hint when a cap (not the rate) refuses work")
    long_job_s: float = Field(
        120.0, description="work estimated past this many worker-seconds waits on the long queues (contract/cost.py)"
    )
    tenant_budget_s: float = Field(
        4 * 3600.0, description="estimated worker-seconds a tenant may have queued or running at once"
    )

    # request limits
    max_body_bytes: int = 8 << 20
    max_upload_bytes: int = Field(8 << 30, description="one file uploaded to the registry (admin scope)")
    probe_timeout_s: int = Field(300, description="registration waits this long for a worker to load the model")
    staging_ttl_s: int = Field(
        24 * 3600, description="uploads staged for registration and left unregistered this long are removed"
    )
    max_test_points: int = 256
    max_index_test_points: int = Field(
        100_000, description="test points of a leakage analysis through an index (its candidates are few)"
    )
    leakage_part_rows: int = Field(1024, description="test points per part of a leakage analysis through an index")
    max_top_k: int = 100
    max_memorization_records: int = 64
    max_reference_records: int = Field(4096, description="clean reference set of a mislabeled analysis")
    max_wait_s: float = Field(30.0, description="longest long poll (GET ...?wait_s=) the API holds open")
    events_interval_s: float = Field(0.5, gt=0, description="how often a job's event stream reads its progress")
    events_keepalive_s: float = Field(
        15.0, gt=0, description="an event stream's comment line after this long unchanged"
    )

    # webhooks (a request's `webhook`: its final view POSTed, signed, once it ends)
    webhook_hosts: list[str] = Field(
        ["127.0.0.1", "localhost"], description='hosts a webhook may call ("*": any); JSON list in the env var'
    )
    webhook_attempts: int = Field(6, ge=1, description="tries per delivery, 1 s apart doubling (1, 2, 4, 8, 16 s)")
    webhook_timeout_s: float = Field(10.0, gt=0, description="one try's limit")

    # jobs and caches
    job_timeout_s: int = 3600
    job_retries: int = Field(2, description="re-runs of a job whose worker died (SIGKILL, OOM)")
    heartbeat_ttl_s: int = Field(30, description="a running job not heartbeated this long is abandoned")
    ready_ttl_s: int = Field(5, description="a worker not heard from this long is not counted by /readyz")
    worker_redis_retries: int = Field(
        15, description="a worker retries a Redis command this often (back-off 0.1 s doubling to 2 s: ~25 s)"
    )
    maintenance_interval_s: int = Field(10, description="how often a worker requeues abandoned jobs")
    score_ttl_s: int = 7 * 24 * 3600
    base_loss_ttl_s: int = 30 * 24 * 3600
    job_record_ttl_s: int = 24 * 3600
    result_cache_bytes: int = Field(32 << 20, description="finished results each API process keeps parsed")

    # scale-out: one request over many workers (docs/scaling.md)
    part_records: int = Field(
        250_000,
        description="training records per shard job: a larger training set is swept by one RQ job per group of "
        "whole shards of at most this many records (a larger shard is a job of its own) plus a reduce job",
    )
    affinity_buckets: int = Field(16, description="shard-job queues; a dataset's shard always goes to the same one")
    worker_queues: str = Field(
        "",
        description="the affinity queues a worker takes first, as bucket numbers ('0,4' or '0-3'); empty: an even "
        "share among the live workers, claimed at start",
    )
    steal_after_s: float = Field(
        1.0, description="an idle worker waits this long on its own queues before taking others' work"
    )
    score_dir: Path = Field(
        Path("var/scores"),
        description="score blocks and curvature too large for Redis: a directory all processes share",
    )
    score_redis_max_bytes: int = Field(4 << 20, description="larger score blocks and curvature go to score_dir")
    scores_page_values: int = Field(
        1_000_000, description="most scores in one JSON answer of /scores (it pages past it)"
    )

    # worker
    device: str = Field("auto", description='"auto" (cuda if available, else cpu), "cpu", "cuda:0", ...')
    torch_threads: int = Field(0, description="a worker's torch threads (0: torch's default, every core)")
    stacking: Literal["auto", "vmap", "loop", "layers"] = Field(
        "auto", description="how several test points meet a batch (engine: MirrorConfig.stacking); auto measures"
    )
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="compute dtype of new requests (resolved by the API, part of each job's identity)"
    )
    batch_size: int = Field(1024, description="training records per forward batch (a model's manifest may set its own)")
    warm_bytes: int | None = Field(
        None, gt=0, description="budget of the worker's warm cache (models, shards, losses); unset: warm_share"
    )
    warm_share: float = Field(
        0.5,
        gt=0,
        le=0.9,
        description="without warm_bytes: this share of the memory free where the worker's tensors live when it "
        "starts (a GPU's, or the host's), on CPU split among the host's workers (cores / torch_threads)",
    )
    warm_on_start: bool = True
    progress_interval_s: float = 0.25
    stop_within_s: float = Field(
        1.0, ge=0, description="a canceled job still inside a batch of its sweep this long after is interrupted"
    )

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))
