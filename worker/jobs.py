"""RQ entry points: run a resolved payload on warm state, as one job or fanned out over the training set.

    run(payload)                    the whole training set in this job: one part, then its reduction
    run_part(payload, first, stop)  shards [first, stop) of the training set: the mirrored step, the sweep,
                                    the part's score block (score store) and its summary (the RQ return value)
    reduce(payload)                 RQ runs it once every part has ended (a dependency that allows failure):
                                    the parts' summaries merged into the result, or a part's failure reported

Payloads are enqueued by the API (contract/jobs.py), resolved completely at the door; this module runs
them exactly and records what the engine made of them (the result's `execution`). Each part computes the
mirrored step itself: it is deterministic (the curvature is one stored estimate for the whole fleet) and
costs milliseconds against the sweep's seconds (docs/scaling.md). Whatever a job raises ends it as RQ's
FAILED with the exception's message (worker/__main__.py), never retried; a cancel stops it as STOPPED at
the next batch; only a worker that dies mid-job leaves it to be retried by another.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from rq import get_current_job
from rq.job import Job as RQJob
from rq.job import JobStatus

from contract.jobs import (
    ENGINE_VERSION,
    AttributionJob,
    DatasetRef,
    InlinePoints,
    ModelRef,
    RecordPoints,
    echo,
    part_id,
)
from contract.kinds import ANALYSES, JOB, Job, calibration_rows
from contract.method import Method
from contract.registry import DatasetManifest, ModelManifest, Registry, RegistryError
from contract.results import Calibrated, Ends, Fitted, StoredAnalysis, StoredAttribution, SweepPart
from contract.schemas import Execution, Influence, Progress, RowAttribution, TestPoint, Timing
from contract.settings import Settings

from .analyses import Evidence
from .forward_inf import AttributionInputError, Calibration, ForwardInf, Mirror, MirrorConfig
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
    sweeping: bool = False  # inside `interruptible`
    running: int | None = None  # ... past its first batch: the thread `interrupt` may stop
    lock: threading.Lock = field(default_factory=threading.Lock)
    stats: dict = field(default_factory=lambda: {"jobs": 0, "job_seconds": 0.0})


_context: Context | None = None


def bind(context: Context) -> None:
    global _context
    _context = context


class Reporter:
    """Progress (rate-limited) into the job's meta, or for a part into the fan-out's progress hash, and
    the stop check on every batch (in memory)."""

    def __init__(self, job: RQJob | None, context: Context, part: tuple[str, int] | None = None):
        self.job, self.context, self.part = job, context, part
        self.started, self.last = time.time(), 0.0  # the first tick reports
        self.timing = Timing()
        self.progress = Progress()

    def __call__(self, done: int, total: int | None, force: bool = False) -> None:
        if self.context.stop.is_set():
            raise Stopped
        if done and self.context.sweeping and self.context.running is None:
            with self.context.lock:
                self.context.running = threading.get_ident()
        now = time.time()
        if not force and now - self.last < self.context.settings.progress_interval_s:
            return
        self.last = now
        self.progress.done, self.progress.total = done, total
        if total and done:
            self.progress.eta_s = round((now - self.started) / done * (total - done), 3)
        if self.part is not None:
            self.context.store.progress(*self.part, done, total, self.progress.eta_s)
        elif self.job is not None:
            self.job.meta.update(progress=self.progress.model_dump(), timing=self.timing.model_dump())
            self.job.save_meta()


# -- RQ entry points --------------------------------------------------------------------------------
Part = Callable[[Any, "Context", Reporter, int, int], BaseModel]  # (job, context, reporter, first, stop) -> summary
Merge = Callable[[Any, "Context", list], dict]  # (job, context, the parts' summaries) -> the reduce's record


def entry_points(part: Part, merge: Merge, summary: type[BaseModel], of: str,
                 size=lambda job, data_m: len(data_m.shards)):  # fmt: skip
    """A kind's three RQ entry points (contract/jobs.py names them by dotted path): the whole job as one
    part, one part [first, stop) (at most `size(job, data_m)`; its `summary` is its RQ return value, as
    JSON), and the reduce over the parts' summaries (`of`: what the parts split, for a failed part's
    message). `merge` stores the result and returns what the reduce's RQ record keeps."""

    def run(payload: dict) -> dict:
        job, rq_job, ctx = begin(payload, lambda key: key)
        with counted(ctx):
            data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
            return merge(job, ctx, [part(job, ctx, Reporter(rq_job, ctx), 0, size(job, data_m))])

    def run_part(payload: dict, first: int, stop: int) -> dict:
        job, rq_job, ctx = begin(payload, lambda key: part_id(key, first))
        with counted(ctx):
            data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
            done = part(job, ctx, Reporter(rq_job, ctx, (job.key, first)), first, min(stop, size(job, data_m)))
            return done.model_dump(mode="json")

    def reduce(payload: dict) -> dict:
        job, rq_job, ctx = begin(payload, lambda key: key)
        summaries = [summary.model_validate(s) for s in finished_parts(rq_job, of)]
        with counted(ctx):
            return merge(job, ctx, summaries)

    return run, run_part, reduce


def finished_parts(rq_job: RQJob | None, of: str) -> list[dict]:
    """A reduce's parts' summaries (their RQ return values), in the parts' order; where a part failed, an
    AttributionInputError with its reason (the reduce runs once every part has ended, failed ones too)."""
    parts = sorted(
        rq_job.fetch_dependencies() if rq_job is not None else [], key=lambda p: int(p.id.rpartition("-p")[2])
    )
    summaries = []
    for n, part in enumerate(parts):
        status = part.get_status(refresh=False)
        if status != JobStatus.FINISHED:
            reason = part.meta.get("error") or f"it ended {status}"
            raise AttributionInputError(f"part {n + 1} of {len(parts)} {of} failed: {reason}")
        summaries.append(part.return_value())
    return summaries


def probe(payload: dict) -> dict:
    """Registration's dry run: the staged model `payload["id"]` loaded as a request would load it, and one
    mirrored step (with the model's default perturbed parameters) on a made-up example of its input spec;
    fails with the reason when any of that does not work."""
    if _context is None:
        raise RuntimeError(f"{__name__} runs inside `python -m worker` (no worker context bound)")
    m = _context.registry.staged_model(payload["id"])
    if m is None:
        raise RegistryError(f"model {payload['id']!r}: nothing staged")
    model, task = _context.warm.load_model(m, torch.float32)
    spec = m.input
    shape = [min(spec.max_length or 16, 16) if n == -1 else n for n in spec.shape]
    if spec.dtype == "int64":
        example = {"inputs": torch.full((1, *shape), min(1, (spec.vocab_size or 2) - 1), dtype=torch.int64)}
    else:
        example = {"inputs": torch.zeros((1, *shape))}
    if m.task == "classification":
        example["targets"] = torch.zeros(1, dtype=torch.int64)
    elif m.task == "regression":
        with torch.no_grad():
            example["targets"] = torch.zeros_like(model(example["inputs"]))
    fi = ForwardInf(model, task, MirrorConfig(precondition="none", params=tuple(m.method.params or ("*",))))
    step = fi.mirror(example)
    if not torch.isfinite(step.test_loss).all():
        raise AttributionInputError("the model's loss on a made-up example of its input spec is not finite")
    return {
        "parameters": [name for name, _ in model.named_parameters()],
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "perturbed": list(fi.fm.theta),
        "perturbed_count": sum(p.numel() for p in fi.fm.theta.values()),
        "example_loss": float(step.test_loss[0]),
    }


def begin(payload: dict, expected_id) -> tuple[Job, RQJob | None, Context]:
    if _context is None:
        raise RuntimeError(f"{__name__} runs inside `python -m worker` (no worker context bound)")
    job = JOB.validate_python(payload)
    if job.engine_version != ENGINE_VERSION:
        raise AttributionInputError(
            f"the request was resolved for engine {job.engine_version}; this worker runs {ENGINE_VERSION}: submit it again"
        )
    rq_job = get_current_job()
    if rq_job is not None and rq_job.id != expected_id(job.key):
        raise AttributionInputError("the payload's identity differs from its job id (API and worker versions differ)")
    return job, rq_job, _context


@contextlib.contextmanager
def counted(ctx: Context):
    started = time.time()
    try:
        yield
    finally:
        ctx.stats["jobs"] += 1
        ctx.stats["job_seconds"] += time.time() - started


@contextlib.contextmanager
def interruptible(ctx: Context):
    """The engine's sweep, which `interrupt` may stop once its first batch has ended (the Reporter marks
    it): not before, where a first call imports modules lazily (an exception inside an import leaves the
    module broken for every later job: measured, torch._dynamo) and chooses how rows stack; never outside
    it, where the job writes to Redis and files."""
    ctx.sweeping = True
    try:
        yield
    finally:
        with ctx.lock:
            ctx.sweeping, ctx.running = False, None


def interrupt(ctx: Context) -> bool:
    """Raise Stopped in the thread of a job told to stop that is still inside a batch of its sweep (a batch
    longer than the stop check's wait: a large model, many rows), as RQ's own time limit raises in a job;
    True if it did."""
    with ctx.lock:
        if ctx.running is None or not ctx.stop.is_set():
            return False
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ctx.running), ctypes.py_object(Stopped))
        return True


# -- one part: the mirrored step and the sweep over shards [first, stop) ------------------------------------
def sweep_part(job: Job, ctx: Context, reporter: Reporter, first: int, stop: int) -> SweepPart:
    """Score block of shards [first, stop) into the score store, and the part's summary."""
    reporter(0, None)  # a job told to stop before its first batch stops here
    t = time.perf_counter()
    model_m = current(ctx.registry.model(job.model.id), job.model, "model")
    data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
    test = request_rows(job, ctx, model_m, data_m)
    fi = engine(ctx, model_m, data_m, job.method, job.dtype)
    reporter.timing.load_s = time.perf_counter() - t

    t = time.perf_counter()
    mirror = ctx.warm.mirror(job.key, lambda: fi.mirror(test))  # once per request on this worker
    reporter.timing.mirror_s = time.perf_counter() - t

    t = time.perf_counter()
    config = fi.config
    passes = -(-mirror.test_loss.shape[0] // config.max_param_sets)
    per_shard = [passes * -(-s.size // config.batch_size) for s in data_m.shards[first:stop]]
    total, parts, calibrated = sum(per_shard), [], []
    # mislabeled: every part fits the same calibration (the same reference set and model)
    spec = ANALYSES.get(job.kind)
    calibrator = fi.calibration(test) if spec is not None and spec.calibrated else None
    for i, n in enumerate(range(first, stop)):
        before = sum(per_shard[:i])
        prepare_shard(ctx, fi, model_m, data_m, n, job.dtype)
        with interruptible(ctx):
            parts.append(fi.sweep(mirror, lambda done, _t, before=before: reporter(before + done, total)))
        if calibrator is not None:
            calibrated.append(fi.calibrated_log_probabilities(calibrator))
    scores = torch.cat(parts, dim=1).float()  # (rows, width)
    reporter.timing.sweep_s = time.perf_counter() - t
    ctx.store.measured(job.model, job.dtype, job.method, reporter.timing.sweep_s, scores.numel())
    lo = int(data_m.bounds[first])
    summary = summarize(job, ctx, fi, mirror, scores, lo, reporter, total)
    if calibrated:
        log_probabilities = torch.cat(calibrated).T.float().cpu().numpy()  # (classes, width)
        fitted = Fitted(temperature=calibrator.temperature, bias=calibrator.bias, confusion=calibrator.confusion)
        summary.calibrated = Calibrated(
            calibration=fitted, block=ctx.store.put_block(_calibrated(job.key), lo, log_probabilities)
        )
    return summary


def summarize(job: Job, ctx: Context, fi: ForwardInf, mirror: Mirror, scores: torch.Tensor, lo: int,
              reporter: Reporter, batches: int, columns: np.ndarray | None = None) -> SweepPart:  # fmt: skip
    """A part's summary with its (rows, width) float32 scores stored as the block at `lo`: of training
    records lo.., or of the records `columns` (two-stage: the candidates, worker/index.py)."""
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise AttributionInputError(
            f"{bad} of {scores.numel()} scores are not finite (the step overflowed the model): use a smaller "
            "method.lr or fewer method.steps, or mode='linear'"
        )
    t = time.perf_counter()
    block, ends = ctx.store.put_block(job.key, lo, scores.numpy()), {}
    if isinstance(job, AttributionJob):  # each row's best and worst of this part, by global index
        k = min(ctx.settings.max_top_k, scores.shape[1])
        index = (lambda i: i + lo) if columns is None else (lambda i: torch.from_numpy(columns)[i])
        for side, largest in (("high", True), ("low", False)):
            best = scores.topk(k, dim=1, largest=largest)
            ends[side] = Ends(values=best.values.tolist(), records=index(best.indices).tolist())
    reporter.timing.store_s = time.perf_counter() - t
    reporter(batches, batches, force=True)
    return SweepPart(
        block=block,
        rows=scores.shape[0],
        execution=execution(fi, job, mirror),
        test_loss=mirror.test_loss.tolist(),
        self_score=mirror.self_score.tolist(),
        memorized=mirror.memorized.tolist(),
        predictions=mirror.predictions,
        batches=batches,
        timing=reporter.timing.model_copy(),
        columns=None if columns is None else columns.tolist(),
        **ends,
    )


# -- the reduction: parts' summaries -> the result --------------------------------------------------------
def finish(job: Job, ctx: Context, summaries: list[SweepPart]) -> dict:
    """Merge the parts (in training-set order) into the result and store it."""
    summaries = sorted(summaries, key=lambda s: s.block.lo)
    first = summaries[0]
    data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
    blocks = [s.block for s in summaries]
    batches = sum(s.batches for s in summaries)
    spent = {
        name: sum(getattr(s.timing, name) for s in summaries) for name in ("load_s", "mirror_s", "sweep_s", "store_s")
    }
    timing = Timing(**spent, search_s=first.timing.search_s)  # compute seconds; search: two-stage's one part
    common = {
        "job": job,
        "execution": first.execution,
        "progress": Progress(done=batches, total=batches, eta_s=0.0),
        "blocks": blocks,
        "shape": (first.rows, data_m.size),
        "timing": timing,
        "columns": first.columns,
    }
    record_ids = ctx.warm.record_ids(data_m)
    tests = echoed(ctx, job.test) if "test" in type(job).model_fields else []
    for test, prediction in zip(tests, first.predictions or [], strict=False):
        test.update(prediction.model_dump())  # classification: the true label, and what the model predicts
    if isinstance(job, AttributionJob):
        training = isinstance(job.points, RecordPoints) and job.points.dataset.digest == job.dataset.digest
        rows = _top(summaries, record_ids, tests, ctx.settings.max_top_k, training)
        result = StoredAttribution(**common, rows=rows, index=first.index)
    else:
        t = time.perf_counter()
        calibration = calibration_records(job, data_m)
        scores = torch.from_numpy(np.concatenate([ctx.store.get_block(job.key, b, first.rows) for b in blocks], axis=1))
        model_m = current(ctx.registry.model(job.model.id), job.model, "model")
        labels = None
        if model_m.task == "classification":
            shards = range(len(data_m.shards))
            labels = torch.from_numpy(np.concatenate([data_m.rows(n, keys=("targets",))["targets"] for n in shards]))
        base = torch.cat([_stored_base(ctx, model_m, data_m, n, job.dtype) for n in range(len(data_m.shards))])
        spec = ANALYSES[job.kind]
        extra = _inputs(job, ctx, model_m, data_m) if spec.inputs else {}
        if spec.calibrated:
            calibrator = Calibration(**first.calibrated.calibration.model_dump())
            parts, classes = [s.calibrated.block for s in summaries], len(calibrator.bias)
            log_probabilities = [ctx.store.get_block(_calibrated(job.key), b, classes) for b in parts]
            extra = {
                "calibrated": torch.from_numpy(np.concatenate(log_probabilities, axis=1).T),
                "calibrator": calibrator,
            }
        evidence = Evidence(
            scores=scores,
            own=torch.tensor(first.self_score),
            own_loss=torch.tensor(first.test_loss),
            base=base,
            record_ids=record_ids,
            n=first.rows - len(calibration),
            calibration=calibration,
            labels=labels,
            records=torch.tensor(job.points.indices) if isinstance(job.points, RecordPoints) else None,
            tests=tests,
            **extra,
        )
        analysis = spec.part("compute")(evidence, job)
        timing.store_s += time.perf_counter() - t
        common["shape"] = (evidence.n, data_m.size)  # the calibration rows are the analysis' own business
        result = StoredAnalysis(**common, analysis=analysis)
    ctx.store.put_result(job.key, result)
    return {"key": job.key, "shape": list(result.shape), "parts": len(summaries)}


def _calibrated(key: str) -> str:
    """Where a mislabeled job's parts keep their training records' class log-probabilities under the fitted
    calibration (one row per class, beside the scores: in the result's own folder when on disk)."""
    return f"{key}/calibrated"


def request_rows(job: Job, ctx: Context, model_m: ModelManifest, data_m: DatasetManifest) -> dict:
    """The request's rows as a batch: its test points, then the training records an analysis adds as
    calibration queries (for its thresholds)."""
    test = _test_points(job.points, ctx, model_m, job.dtype)
    calibration = calibration_records(job, data_m)
    if len(calibration):
        extra = ctx.warm.examples(data_m, calibration.tolist())
        pads = {"inputs": model_m.input.pad_id}  # token ids pad with the model's pad id, masks with 0
        test = {k: _concat(v, extra[k].to(v), pads.get(k, 0)) for k, v in test.items()}
    return test


def _inputs(job: Job, ctx: Context, model_m: ModelManifest, data_m: DatasetManifest) -> dict:
    """What a kind that compares inputs (AnalysisSpec.inputs: leakage) reads besides the model's response
    (Evidence's fields): the training and test inputs as vectors, or as text where the model reads text;
    nothing for other token inputs."""
    spec = model_m.input
    if spec.dtype != "float32" and spec.text is None:
        return {}  # read nothing: token ids without text have only the copy rule
    train = np.concatenate([data_m.rows(n, keys=("inputs",))["inputs"] for n in range(len(data_m.shards))])
    test = _test_points(job.points, ctx, model_m, job.dtype)["inputs"].cpu()
    if spec.dtype == "float32":
        return {
            "inputs": torch.from_numpy(train),
            "query_inputs": test,
            "image_shape": spec.image_shape,
            "input_range": spec.range,
        }

    def text(ids) -> str:
        return model_m.decode([int(t) for t in ids if t != spec.pad_id])

    return {"texts": [text(row) for row in train], "query_texts": [text(row) for row in test.tolist()]}


def echoed(ctx: Context, points: RecordPoints | InlinePoints) -> list[dict]:
    """Each test point's echo in the result (contract.jobs.echo), with its dataset's record ids."""
    if not isinstance(points, RecordPoints):
        return echo(points, [])
    return echo(points, ctx.warm.record_ids(_points_dataset(ctx, points)))


def _points_dataset(ctx: Context, points: RecordPoints) -> DatasetManifest:
    """The dataset the records come from, as the request saw it."""
    return current(ctx.registry.dataset(points.dataset.id), points.dataset, "dataset")


def _stored_base(ctx: Context, model_m: ModelManifest, data_m: DatasetManifest, n: int, dtype: str) -> torch.Tensor:
    raw = ctx.store.get_base(model_m.digest, data_m.digest, n, dtype)
    if raw is None:
        raise RegistryError(f"the base losses of shard {n} of {data_m.id!r} expired before the reduce")
    return torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).float()


def _top(summaries: list[SweepPart], record_ids, tests: list[dict], k: int, training: bool) -> list[RowAttribution]:
    """Each row's top-k proponents and opponents over the whole training set, from every part's own.
    `training`: the rows are training records, which alone can be memorised (a held-out point the model
    predicts with near-zero loss is not)."""

    def merged(side: str, largest: bool) -> list[list[Influence]]:
        values = torch.cat([torch.tensor(getattr(s, side).values) for s in summaries], dim=1)
        indices = torch.cat([torch.tensor(getattr(s, side).records) for s in summaries], dim=1)
        best = values.topk(min(k, values.shape[1]), dim=1, largest=largest)
        return [
            [Influence(record_id=record_ids[i], index=i, score=v) for v, i in zip(vs, ids, strict=True)]
            for vs, ids in zip(best.values.tolist(), indices.gather(1, best.indices).tolist(), strict=True)
        ]

    first, high, low = summaries[0], merged("high", True), merged("low", False)
    return [
        RowAttribution(
            row=j,
            test=TestPoint(**tests[j]),
            test_loss=first.test_loss[j],
            memorized=training and first.memorized[j],
            proponents=high[j],
            opponents=low[j],
        )
        for j in range(first.rows)
    ]


# -- shared by parts, the reduce and the warm-up --------------------------------------------------------
def engine(ctx: Context, model_m: ModelManifest, data_m: DatasetManifest, method: Method, dtype: str) -> ForwardInf:
    """The warm engine for these settings, planned on a spread sample of the training set, with its
    curvature (one estimate per model, dataset and settings across the fleet)."""
    config = MirrorConfig(
        **method.model_dump(),
        device=str(ctx.warm.device),
        dtype=dtype,
        batch_size=model_m.batch_size or ctx.settings.batch_size,
        stacking=ctx.settings.stacking,
    )
    fi = ctx.warm.engine(model_m, data_m, config)
    if fi.precondition == "auto" or (fi.precondition != "none" and fi.curvature is None):
        sample = ctx.warm.sample(data_m, config.curvature_samples)
        fi.plan(sample)
        if fi.precondition != "none" and fi.curvature is None:  # shared by engines that differ elsewhere
            fi.use(ctx.warm.curvature(model_m, data_m, fi, lambda: fi.estimate_curvature(sample)))
    return fi


def prepare_shard(ctx: Context, fi: ForwardInf, model_m: ModelManifest, data_m: DatasetManifest, n: int, dtype: str):
    """Bind shard n (warm tensors, or streamed) to the engine with its base losses, its inputs to a perturbed
    last module and, for score="cosine", its gradient norms: each computed once (base losses across the
    fleet) and kept."""
    shard = ctx.warm.shard(data_m, n, fi.config.batch_size)
    norms = None
    if fi.config.score == "cosine":
        norms = ctx.warm.norms(model_m, data_m, n, dtype, lambda: fi.last_layer_norms(shard))
    params = list(fi.fm.theta)
    tail = ctx.warm.tail_inputs(model_m, data_m, n, dtype, params, lambda: fi.tail_inputs_of(shard))
    base = ctx.warm.base(model_m, data_m, n, dtype, lambda: fi.prepare(shard, norms=norms, tail_inputs=tail).base)
    fi.prepare(shard, base=base, norms=norms, tail_inputs=tail)


def execution(fi: ForwardInf, job: Job, mirror: Mirror) -> Execution:
    """What ran: the job's method with precondition and params as the engine resolved them, and the rest
    of the engine's own account (contract.schemas.Execution), with the repairs made to this request's step."""
    ran = fi.execution()
    ran["notes"] += mirror.notes
    if job.untrained:
        ran["notes"].append(f"the model was not trained on {job.dataset.id!r}: the request said this is intended")
    update = {"precondition": ran.pop("precondition"), "params": tuple(ran["parameters"])}
    resolved = job.method.model_copy(update=update)
    return Execution(method=resolved, engine_version=ENGINE_VERSION, **ran)


def calibration_records(job: Job, data_m: DatasetManifest) -> torch.Tensor:
    """Training records a kind adds as queries to calibrate its thresholds (AnalysisSpec.calibrates), spread
    evenly over the training set."""
    count = calibration_rows(job, data_m.size)
    if not count:
        return torch.empty(0, dtype=torch.int64)
    return torch.linspace(0, data_m.size - 1, count).round().long().unique()


def current(manifest, ref: ModelRef | DatasetRef, what: str):
    """The registry's entry for `ref`, refused when it is gone or has changed since the request."""
    if manifest is None:
        raise RegistryError(f"{what} {ref.id!r} is no longer registered")
    if manifest.digest != ref.digest:
        raise RegistryError(f"{what} {ref.id!r} changed since the request was made; submit it again")
    return manifest


def _test_points(points: InlinePoints | RecordPoints, ctx: Context, model_m, dtype: str) -> dict:
    """The test points as a batch: records read from their dataset, or the inline data as tensors."""
    if isinstance(points, RecordPoints):
        return ctx.warm.examples(_points_dataset(ctx, points), points.indices)
    floating = getattr(torch, dtype)
    batch = {"inputs": torch.tensor(points.inputs, dtype=torch.int64 if model_m.input.dtype == "int64" else floating)}
    if points.targets is not None:
        classification = model_m.task in ("classification", "causal-lm")
        batch["targets"] = torch.tensor(points.targets, dtype=torch.int64 if classification else floating)
    return batch


def _concat(a: torch.Tensor, b: torch.Tensor, pad: int) -> torch.Tensor:
    """Rows of a then b; token sequences (and their masks) of different lengths are padded with `pad`
    on the right (a model's attention mask and a causal LM's target mask leave it out)."""
    if a.dim() == 2 and not a.is_floating_point() and a.shape[1] != b.shape[1]:
        width = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in (a, b))
    return torch.cat([a, b])


run, run_part, reduce = entry_points(sweep_part, finish, SweepPart, "of the training set")
