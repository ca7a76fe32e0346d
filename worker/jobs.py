"""RQ entry points: validate the payload, run the engine on warm state, store the result.

`attribute(payload)` is enqueued by the API as "worker.jobs.attribute" with a JSON payload (the
`AttributionJob` schema). Errors in the request's substance (input the model cannot take, a registry
entry that changed) end the job with a clear reason and no retry; a worker that dies mid-job leaves
it to be retried by another worker (see worker/__main__.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from rq import get_current_job
from rq.job import Job

from app.schemas import AttributionJob, DatasetTest
from app.settings import Settings

from .analyses import ANALYSES, Evidence
from .forward_inf import AttributionInputError, MirrorConfig
from .registry import Registry, RegistryError
from .store import Store
from .warm import Warm


class Canceled(Exception):
    """The client canceled the job (checked between batches)."""


@dataclass
class Context:
    """What a worker process keeps between jobs."""

    settings: Settings
    registry: Registry
    store: Store
    warm: Warm
    stats: dict = field(default_factory=lambda: {"jobs": 0, "job_seconds": 0.0})


_context: Context | None = None


def bind(context: Context) -> None:
    global _context
    _context = context


class Reporter:
    """Progress into job meta (rate-limited), with the cancel check riding on the same tick."""

    def __init__(self, job: Job | None, context: Context, key: str):
        self.job, self.context, self.key = job, context, key
        self.started, self.last = time.time(), 0.0  # the first tick reports (and checks cancel)
        self.timing = {"load_s": 0.0, "mirror_s": 0.0, "sweep_s": 0.0, "store_s": 0.0}
        self.progress = {"done": 0, "total": None, "unit": "batches", "eta_s": None}

    def __call__(self, done: int, total: int | None, force: bool = False) -> None:
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
        if self.context.store.canceled(self.key):
            raise Canceled


def attribute(payload: dict) -> dict:
    if _context is None:
        raise RuntimeError("worker.jobs.attribute runs inside `python -m worker` (no worker context bound)")
    request = AttributionJob.model_validate(payload)
    job = get_current_job()
    reporter = Reporter(job, _context, request.key)
    started = time.time()
    try:
        return run(request, _context, reporter)
    except Canceled:
        _finish(job, canceled=True)
        return {"key": request.key, "canceled": True}
    except (AttributionInputError, RegistryError) as exc:  # the request's substance: no retry helps
        _finish(job, error=str(exc), failed=True)
        return {"key": request.key, "error": str(exc)}
    finally:
        _context.stats["jobs"] += 1
        _context.stats["job_seconds"] += time.time() - started


def _finish(job: Job | None, **meta) -> None:
    if job is not None:
        job.meta.update(meta)
        job.save_meta()


def run(request: AttributionJob, ctx: Context, reporter: Reporter) -> dict:
    reporter(0, None)  # a job canceled before it started stops here
    t = time.perf_counter()
    model_m, data_m = ctx.registry.model(request.model), ctx.registry.dataset(request.dataset)
    if model_m is None or data_m is None:
        raise RegistryError(f"{request.model!r} or {request.dataset!r} is no longer registered")
    if model_m.digest != request.model_digest or data_m.digest != request.dataset_digest:
        raise RegistryError("the model or dataset changed since the request was made; submit it again")
    shards = [ctx.warm.shard(data_m, n) for n in range(len(data_m.shards))]
    test, records = _test_points(request, ctx, model_m)
    n = len(test["inputs"])
    calibration = torch.empty(0, dtype=torch.int64)
    if request.kind in ("leakage", "memorization"):  # training records as extra queries, for the thresholds
        count = min(request.options.get("calibration_records", 128), data_m.size)
        calibration = torch.linspace(0, data_m.size - 1, count).round().long().unique()
        extra = ctx.warm.examples(data_m, calibration.tolist())
        test = {k: _concat(v, extra[k].to(v)) for k, v in test.items()}
    method = dict(request.method)
    if request.kind == "leakage":
        method["score"] = "signed"  # the analysis compares raw responses itself (worker/analyses.py)
    fi, bases, norms = prepared(ctx, model_m, data_m, shards, method)
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

    t = time.perf_counter()
    result = {
        "kind": request.kind,
        "model": request.model,
        "dataset": request.dataset,
        "test": request.test.model_dump(mode="json", exclude_none=True),
        "method": {k: list(v) if isinstance(v, tuple) else v for k, v in config.to_dict().items()},
        "progress": {"done": total, "total": total, "unit": "batches", "eta_s": 0.0},
    }
    record_ids = ctx.warm.record_ids(data_m)
    if request.kind == "attribution":
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
        result["analysis"] = ANALYSES[request.kind](evidence, request.options)
        scores = scores[: evidence.n]  # the calibration rows are the analysis' own business
    reporter.timing["store_s"] = time.perf_counter() - t  # the summary; the write itself follows
    ctx.store.put_result(request.key, scores.numpy(), {**result, "timing": reporter.timing})
    reporter(total, total, force=True)
    return {"key": request.key, "shape": list(scores.shape)}


def prepared(ctx: Context, model_m, data_m, shards, method: dict):
    """The warm engine for these settings, with its curvature (once per model, dataset and settings)
    and each shard's base losses (warm, from Redis, or computed) and, for score="cosine", gradient norms."""
    method = dict(method)
    config = MirrorConfig.preset(
        method.pop("preset", None) or "attribution",
        **_engine_fields(method),
        device=str(ctx.warm.device),
        dtype=ctx.settings.dtype,
        batch_size=ctx.settings.batch_size,
    )
    fi = ctx.warm.engine(model_m, data_m, config).plan(shards)
    if fi.precondition != "none" and fi.curvature is None:  # shared by engines that differ elsewhere
        fi.curvature = ctx.warm.curvature(model_m, data_m, fi, lambda: fi.estimate_curvature(shards))
    norms = [  # score="cosine": per-shard gradient norms, warm like the base losses
        ctx.warm.norms(model_m, data_m, n, lambda s=s: fi.last_layer_norms(s)) if fi.config.score == "cosine" else None
        for n, s in enumerate(shards)
    ]
    bases = [
        ctx.warm.base(model_m, data_m, n, lambda s=s, v=v: fi.prepare(s, norms=v).base)
        for n, (s, v) in enumerate(zip(shards, norms, strict=True))
    ]
    return fi, bases, norms


ENGINE_FIELDS = {
    "optimizer",
    "lr",
    "steps",
    "direction",
    "mode",
    "params",
    "score",
    "group",
    "safeguard",
    "precondition",
    "damping",
}


def _engine_fields(method: dict) -> dict:
    unknown = set(method) - ENGINE_FIELDS
    if unknown:
        raise AttributionInputError(f"unknown method settings: {sorted(unknown)}")
    return {k: tuple(v) if k == "params" else v for k, v in method.items()}


def _test_points(request: AttributionJob, ctx: Context, model_m) -> tuple[dict, torch.Tensor | None]:
    """The test points as a batch, and their indices when they are records of a registered dataset."""
    if isinstance(request.test, DatasetTest):
        d = ctx.registry.dataset(request.test.dataset)
        if d is None:
            raise RegistryError(f"test dataset {request.test.dataset!r} is no longer registered")
        if request.test.records is not None:
            position = {r: i for i, r in enumerate(d.record_ids())}
            indices = [position[r] for r in request.test.records if r in position]
            if len(indices) != len(request.test.records):
                raise AttributionInputError(f"unknown record ids in {d.id!r}")
        else:
            indices = list(request.test.indices or [])
        batch = ctx.warm.examples(d, indices)
        return {k: v for k, v in batch.items() if k in ("inputs", "targets")}, torch.tensor(indices)
    inline = request.test
    dtype = torch.int64 if model_m.input.dtype == "int64" else ctx.warm.dtype
    batch = {"inputs": torch.tensor(inline.inputs, dtype=dtype)}
    if inline.targets is not None:
        classification = model_m.task in ("classification", "causal-lm")
        batch["targets"] = torch.tensor(inline.targets, dtype=torch.int64 if classification else ctx.warm.dtype)
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

    return [
        {
            "row": j,
            "test_loss": float(mirror.test_loss[j]),
            "memorized": bool(mirror.memorized[j]),
            "proponents": entries(high.values[j], high.indices[j]),
            "opponents": entries(low.values[j], low.indices[j]),
        }
        for j in range(scores.shape[0])
    ]
