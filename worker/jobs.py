"""RQ entry point: validate the payload, run the engine on warm state, store the result.

`run(payload)` is enqueued by the API as `contract.jobs.JOB_FUNC` with a JSON payload, one typed form per
kind (contract/jobs.py), resolved completely at the door: this module runs it exactly as it is and records
what the engine made of it (the result's `execution`). Whatever it raises ends the job as RQ's FAILED with
the exception's message (worker/__main__.py), never retried; a cancel stops it as STOPPED at the next
batch; only a worker that dies mid-job leaves it to be retried by another.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from rq import get_current_job
from rq.job import Job as RQJob

from contract.jobs import ENGINE_VERSION, JOB, AttributionJob, DatasetRef, InlinePoints, Job, ModelRef, RecordPoints
from contract.method import Method
from contract.registry import Registry, RegistryError
from contract.schemas import Execution, RowAttribution
from contract.settings import Settings

from .analyses import ANALYSES, Evidence
from .forward_inf import AttributionInputError, MirrorConfig
from .store import Store
from .warm import Warm


class Stopped(Exception):
    """The job was told to stop (RQ's stop-job command, which a cancel sends); checked between batches."""


@dataclass
class Context:
    """What a worker process keeps between jobs."""

    settings: Settings
    registry: Registry
    store: Store
    warm: Warm
    stop: threading.Event = field(default_factory=threading.Event)  # set by the stop-job command
    stats: dict = field(default_factory=lambda: {"jobs": 0, "job_seconds": 0.0})


_context: Context | None = None


def bind(context: Context) -> None:
    global _context
    _context = context


class Reporter:
    """Progress into job meta (rate-limited), and the stop check on every batch (in memory)."""

    def __init__(self, job: RQJob | None, context: Context):
        self.job, self.context = job, context
        self.started, self.last = time.time(), 0.0  # the first tick reports
        self.timing = {"load_s": 0.0, "mirror_s": 0.0, "sweep_s": 0.0, "store_s": 0.0}
        self.progress = {"done": 0, "total": None, "unit": "batches", "eta_s": None}

    def __call__(self, done: int, total: int | None, force: bool = False) -> None:
        if self.context.stop.is_set():
            raise Stopped
        now = time.time()
        if not force and now - self.last < self.context.settings.progress_interval_s:
            return
        self.last = now
        self.progress.update(done=done, total=total)
        if total and done:
            self.progress["eta_s"] = round((now - self.started) / done * (total - done), 3)
        if self.job is not None:
            self.job.meta.update(progress=self.progress, timing=self.timing)
            self.job.save_meta()


def run(payload: dict) -> dict:
    if _context is None:
        raise RuntimeError(f"{__name__}.run runs inside `python -m worker` (no worker context bound)")
    job = JOB.validate_python(payload)
    if job.engine_version != ENGINE_VERSION:
        raise AttributionInputError(
            f"the request was resolved for engine {job.engine_version}; this worker runs {ENGINE_VERSION}: submit it again"
        )
    rq_job = get_current_job()
    if rq_job is not None and rq_job.id != job.key:
        raise AttributionInputError("the payload's identity differs from its job id (API and worker versions differ)")
    started = time.time()
    try:
        return execute(job, _context, Reporter(rq_job, _context))
    finally:
        _context.stats["jobs"] += 1
        _context.stats["job_seconds"] += time.time() - started


def _current(manifest, ref: ModelRef | DatasetRef, what: str):
    """The registry's entry for `ref`, refused when it is gone or has changed since the request."""
    if manifest is None:
        raise RegistryError(f"{what} {ref.id!r} is no longer registered")
    if manifest.digest != ref.digest:
        raise RegistryError(f"{what} {ref.id!r} changed since the request was made; submit it again")
    return manifest


def execute(job: Job, ctx: Context, reporter: Reporter) -> dict:
    reporter(0, None)  # a job told to stop before its first batch stops here
    t = time.perf_counter()
    model_m = _current(ctx.registry.model(job.model.id), job.model, "model")
    data_m = _current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
    shards = [ctx.warm.shard(data_m, n) for n in range(len(data_m.shards))]
    test, records = _test_points(job.points, ctx, model_m, job.dtype)
    n = len(test["inputs"])
    calibration = torch.empty(0, dtype=torch.int64)
    if job.kind in ("leakage", "memorization"):  # training records as extra queries, for the thresholds
        count = min(job.calibration_records, data_m.size)
        calibration = torch.linspace(0, data_m.size - 1, count).round().long().unique()
        extra = ctx.warm.examples(data_m, calibration.tolist())
        test = {k: _concat(v, extra[k].to(v)) for k, v in test.items()}
    fi, bases, norms = prepared(ctx, model_m, data_m, shards, job.method, job.dtype)
    reporter.timing["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    config = fi.config
    mirror = fi.mirror(test)
    reporter.timing["mirror_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = mirror.test_loss.shape[0]
    passes = -(-rows // config.max_param_sets)
    per_shard = [passes * -(-len(s["inputs"]) // config.batch_size) for s in shards]
    total, parts = sum(per_shard), []
    for i, (shard, base, norm) in enumerate(zip(shards, bases, norms, strict=True)):
        before = sum(per_shard[:i])
        fi.prepare(shard, base=base, norms=norm)
        parts.append(fi.sweep(mirror, lambda done, _t, before=before: reporter(before + done, total)))
    scores = torch.cat(parts, dim=1).float()  # (rows, N)
    reporter.timing["sweep_s"] = time.perf_counter() - t
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise AttributionInputError(
            f"{bad} of {scores.numel()} scores are not finite (the step overflowed the model): use a smaller "
            "method.lr or fewer method.steps, or mode='linear'"
        )

    t = time.perf_counter()
    result = {
        "job": job.model_dump(mode="json"),
        "execution": execution(fi, job.method),
        "progress": {"done": total, "total": total, "unit": "batches", "eta_s": 0.0},
    }
    record_ids = ctx.warm.record_ids(data_m)
    if isinstance(job, AttributionJob):
        result["rows"] = _top(scores, mirror, record_ids, ctx.settings.max_top_k)
    else:
        labels = torch.cat([s["targets"] for s in shards]).cpu() if model_m.task == "classification" else None
        evidence = Evidence(
            scores=scores.cpu(),
            own=mirror.self_score.cpu(),
            own_loss=mirror.test_loss.cpu(),
            base=torch.cat(bases).cpu(),
            record_ids=record_ids,
            n=n if not config.group else 1,
            calibration=calibration,
            labels=labels,
            records=records,
        )
        result["analysis"] = ANALYSES[job.kind](evidence, job)
        scores = scores[: evidence.n]  # the calibration rows are the analysis' own business
    reporter.timing["store_s"] = time.perf_counter() - t  # the summary; the write itself follows
    ctx.store.put_result(job.key, scores.numpy(), {**result, "timing": reporter.timing})
    reporter(total, total, force=True)
    return {"key": job.key, "shape": list(scores.shape)}


def execution(fi, method: Method) -> dict:
    """What ran: the job's method with precondition and params as the engine resolved them, and the rest
    of the engine's own account (contract.schemas.Execution)."""
    ran = fi.execution()
    resolved = method.model_copy(update={"precondition": ran.pop("precondition"), "params": tuple(ran["parameters"])})
    return Execution(method=resolved, engine_version=ENGINE_VERSION, **ran).model_dump(mode="json")


def prepared(ctx: Context, model_m, data_m, shards, method: Method, dtype: str):
    """The warm engine for these settings, with its curvature (once per model, dataset and settings)
    and each shard's base losses (warm, from Redis, or computed) and, for score="cosine", gradient norms."""
    config = MirrorConfig(
        **method.model_dump(), device=str(ctx.warm.device), dtype=dtype, batch_size=ctx.settings.batch_size
    )
    fi = ctx.warm.engine(model_m, data_m, config).plan(shards)
    if fi.precondition != "none" and fi.curvature is None:  # shared by engines that differ elsewhere
        fi.curvature = ctx.warm.curvature(model_m, data_m, fi, lambda: fi.estimate_curvature(shards))
    norms = [  # score="cosine": per-shard gradient norms, warm like the base losses
        ctx.warm.norms(model_m, data_m, n, dtype, lambda s=s: fi.last_layer_norms(s))
        if fi.config.score == "cosine"
        else None
        for n, s in enumerate(shards)
    ]
    bases = [
        ctx.warm.base(model_m, data_m, n, dtype, lambda s=s, v=v: fi.prepare(s, norms=v).base)
        for n, (s, v) in enumerate(zip(shards, norms, strict=True))
    ]
    return fi, bases, norms


def _test_points(
    points: InlinePoints | RecordPoints, ctx: Context, model_m, dtype: str
) -> tuple[dict, torch.Tensor | None]:
    """The test points as a batch, and their indices when they are records of a registered dataset."""
    if isinstance(points, RecordPoints):
        d = _current(ctx.registry.dataset(points.dataset.id), points.dataset, "dataset")
        batch = ctx.warm.examples(d, points.indices)
        return {k: v for k, v in batch.items() if k in ("inputs", "targets")}, torch.tensor(points.indices)
    floating = getattr(torch, dtype)
    batch = {"inputs": torch.tensor(points.inputs, dtype=torch.int64 if model_m.input.dtype == "int64" else floating)}
    if points.targets is not None:
        classification = model_m.task in ("classification", "causal-lm")
        batch["targets"] = torch.tensor(points.targets, dtype=torch.int64 if classification else floating)
    return batch, None


def _concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a then b; token sequences (and their masks) of different lengths are padded with 0, which
    a causal LM's target mask leaves out of the loss."""
    if a.dim() == 2 and not a.is_floating_point() and a.shape[1] != b.shape[1]:
        width = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (a, b))
    return torch.cat([a, b])


def _top(scores: torch.Tensor, mirror, record_ids: list[str], k: int) -> list[dict]:
    k = min(k, scores.shape[1])
    high, low = scores.topk(k, dim=1), scores.topk(k, dim=1, largest=False)

    def entries(values, indices):
        return [
            {"record_id": record_ids[i], "index": i, "score": v}
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    return [  # through the contract's schema once here, so the API can serve it as stored
        RowAttribution(
            row=j,
            test_loss=float(mirror.test_loss[j]),
            memorized=bool(mirror.memorized[j]),
            proponents=entries(high.values[j], high.indices[j]),
            opponents=entries(low.values[j], low.indices[j]),
        ).model_dump(mode="json")
        for j in range(scores.shape[0])
    ]
