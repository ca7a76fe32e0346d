"""The training-side index and two-stage attribution: RQ entry points beside worker/jobs.py's.

    run_part(payload, first, stop)  an IndexJob's shards [first, stop): each record's gradient sketch in the
                                    index's basis (ForwardInf.sketch), one FAISS file per shard in the score
                                    directory; a shard whose sketches the basis already holds is skipped
    reduce(payload)                 once every part has ended: the catalog entry (contract/indexes.py), with
                                    the recall measured on probe queries
    run(payload)                    both, where the training set is one part
    attribute(payload)              an attribution with an index: the mirrored step, the index's candidates
                                    at both ends for every test point, then a forward sweep over those
                                    records only: their exact Forward-INF scores (the same as a full sweep's)

The basis (sketch.py: the curvature's top eigenvectors and a whitened random sketch of the rest) is made
once across the fleet from the engine's stored curvature and kept in the store, so every part, and a later
version of the dataset that adopts it, sketches in the same space.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime

import numpy as np
import torch
from safetensors.torch import load_file, save

from contract.indexes import IndexEntry, IndexShard, basis_path, default_candidates, embedding_path, shard_path
from contract.jobs import AttributionJob, IndexJob
from contract.registry import DatasetManifest, RegistryError
from contract.results import IndexPart
from contract.schemas import IndexUse

from . import search
from .forward_inf import ForwardInf
from .forward_inf.data import spread
from .forward_inf.sketch import Basis
from .jobs import (
    Context,
    Reporter,
    begin,
    counted,
    current,
    engine,
    entry_points,
    finish,
    prepare_shard,
    request_rows,
    summarize,
)
from .leakage import embed_shard, embeds
from .store import claim, write_aside

SEED = 0  # the basis' random sketch: the same on every worker
PROBES = 8  # recall at build: training records spread over the set, used as queries
RECALL_RECORDS = 10_000_000  # ... scored by a full sweep up to this many records; past it, on a sample of
PROBE_SAMPLE = 20_000  # this many records spread over the set


# -- RQ entry points (run, run_part, reduce: at the end) ---------------------------------------------
def attribute(payload: dict) -> dict:
    job, rq_job, ctx = begin(payload, lambda key: key)
    with counted(ctx):
        return two_stage(job, ctx, Reporter(rq_job, ctx))


# -- building ------------------------------------------------------------------------------------------
def build_part(job: IndexJob, ctx: Context, reporter: Reporter, first: int, stop: int) -> IndexPart:
    """Sketch shards [first, stop) into their FAISS files; the part's summary."""
    reporter(0, None)
    model_m = current(ctx.registry.model(job.model.id), job.model, "model")
    data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
    fi = engine(ctx, model_m, data_m, job.method, job.dtype)
    for path, kept in (
        (basis_path(ctx.settings, job.basis), "index-basis"),
        (embedding_path(ctx.settings, job.basis), "index-embedding"),
    ):
        if not claim(path):  # new, or its index was deleted meanwhile: made again, not served from memory
            ctx.warm.drop((kept, job.basis))
    basis = _basis(ctx, job.basis, None if job.basis_of else fi, job)
    batches = [-(-s.size // fi.config.batch_size) for s in data_m.shards[first:stop]]
    total, shards = sum(batches), []
    for i, n in enumerate(range(first, stop)):
        shard, before = data_m.shards[n], sum(batches[:i])
        path = shard_path(ctx.settings, job.basis, shard.sha256)
        started = time.perf_counter()
        made = not claim(path)  # else sketched before in this basis (an earlier version of the dataset)
        if made:
            prepare_shard(ctx, fi, model_m, data_m, n, job.dtype)
            vectors = fi.sketch(basis, lambda done, _t, before=before: reporter(before + done, total))
            index = search.make(vectors.float().cpu().numpy())
            write_aside(path, lambda f, index=index: f.write(search.dump(index)))
        size = path.stat().st_size + (embed_shard(ctx, job.basis, model_m, data_m, n) if embeds(model_m) else 0)
        seconds = time.perf_counter() - started if made else 0.0
        shards.append(IndexShard(sha256=shard.sha256, records=shard.size, bytes=size, seconds=seconds))
        reporter(before + batches[i], total, force=True)
    return IndexPart(shards=shards)


def catalog(job: IndexJob, ctx: Context, summaries: list[IndexPart]) -> dict:
    """The finished index's catalog entry (the parts' shards in the dataset's order), with its recall."""
    model_m = current(ctx.registry.model(job.model.id), job.model, "model")
    data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
    by_sha = {s.sha256: s for part in summaries for s in part.shards}
    shards = [by_sha[s.sha256] for s in data_m.shards]
    fi = engine(ctx, model_m, data_m, job.method, job.dtype)
    basis = _basis(ctx, job.basis)
    recall, how = _recall(ctx, job, fi, basis, data_m, shards)
    size = sum(s.bytes for s in shards)
    entry = IndexEntry(
        id=job.key,
        model=job.model,
        dataset=job.dataset,
        method=job.method,
        settings=job.settings,
        dtype=job.dtype,
        basis=job.basis,
        basis_of=job.basis_of or job.dataset,
        parameters=basis.names,
        exact=basis.exact,
        records=data_m.size,
        bytes=size,
        bytes_per_record=size / max(data_m.size, 1),
        search="pq" if any(search.kind_for(s.records) == "pq" for s in shards) else "flat",
        shards=shards,
        build_s=sum(s.seconds for s in shards),
        recall=recall,
        recall_method=how,
        created=datetime.now(UTC),
    )
    ctx.store.put_index(entry)
    return {"key": job.key, "records": entry.records, "bytes": entry.bytes}


def _basis(ctx: Context, name: str, fi: ForwardInf | None = None, job: IndexJob | None = None) -> Basis:
    """Basis `name`: kept warm, else read from the index's folder, else (given the engine and the build job)
    made from the engine's curvature by one worker of the fleet at a time and written there."""
    path = basis_path(ctx.settings, name)

    def make() -> None:
        if fi is None:
            raise RegistryError("the index's sketch basis is gone (the index was deleted?): build the index anew")
        b = fi.basis(job.settings.dims, job.settings.rank, SEED)
        meta = {"names": json.dumps(b.names), "sizes": json.dumps(b.sizes), "exact": str(b.exact)}
        raw = save({k: v.cpu().contiguous() for k, v in b.tensors().items()}, metadata=meta)
        write_aside(path, lambda f: f.write(raw))

    def load() -> Basis:
        ctx.store.once(f"index-basis-{name}", make, path.is_file)
        tensors = load_file(path, device=str(ctx.warm.device))
        with open(path, "rb") as f:
            meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
        return Basis(json.loads(meta["names"]), json.loads(meta["sizes"]), tensors["database"], tensors["query"],
                     int(meta["exact"]))  # fmt: skip

    return ctx.warm.keep(("index-basis", name), load)


def _recall(
    ctx: Context, job: IndexJob, fi: ForwardInf, basis: Basis, data_m: DatasetManifest, shards: list[IndexShard]
):
    """(The share of the method's true top-10 at each end that the index puts among its default candidates,
    how it was measured): PROBES training records spread over the set as queries, each one itself left out.
    Up to RECALL_RECORDS records, the truth is a full sweep of the probes and the candidates the index's own
    search (what a two-stage answer gets); past it, PROBE_SAMPLE records spread over the set, and the sketch's
    top c of them, c the same share of the sample as the default candidates are of the set (an estimate
    that runs low: the sample's top-10 are less extreme than the set's)."""
    model_m = current(ctx.registry.model(job.model.id), job.model, "model")
    size, m = data_m.size, default_candidates(data_m.size)
    own = spread(size, PROBES)
    mirror = fi.mirror(ctx.warm.examples(data_m, own.tolist()))
    queries = fi.config.sign * basis.queries(mirror.first)
    if size <= RECALL_RECORDS:
        exact = []
        for n in range(len(data_m.shards)):
            prepare_shard(ctx, fi, model_m, data_m, n, job.dtype)
            exact.append(fi.sweep(mirror))
        exact, columns = torch.cat(exact, dim=1), torch.arange(size)  # (PROBES, N)
        found = shards_of(ctx, job.basis, shards, data_m).search(queries.float().cpu().numpy(), m + 1)
        how = f"{PROBES} training records as queries, each scored by a full sweep; the index's own {m:,} candidates"
    else:
        columns = spread(size, PROBE_SAMPLE)
        fi.prepare(ctx.warm.examples(data_m, columns.tolist()))
        exact, approx = fi.sweep(mirror), (queries @ fi.sketch(basis).T).cpu()  # (PROBES, sample)
        c = max(10, math.ceil(len(columns) * m / size))
        found = [columns[approx.topk(c + 1, dim=1, largest=largest).indices].numpy() for largest in (True, False)]
        how = (f"{PROBES} training records as queries against {len(columns):,} records spread over the set: their "
               f"top-10 at each end among the sketch's top {c} (the share of the sample that {m:,} candidates are "
               "of the set: an estimate that runs low)")  # fmt: skip
    hits = 0
    for j, probe in enumerate(own.tolist()):
        for side, largest in enumerate((True, False)):
            row = exact[j].masked_fill(columns == probe, -math.inf if largest else math.inf)
            truth = set(columns[row.topk(10, largest=largest).indices].tolist())
            hits += len(truth & (set(found[side][j].tolist()) - {probe}))
    return hits / (20 * PROBES), how


# -- two-stage attribution ------------------------------------------------------------------------------
def two_stage(job: AttributionJob, ctx: Context, reporter: Reporter) -> dict:
    """The index's candidates for every test point (both ends), re-scored by the mirrored step and a
    forward sweep over them alone: the result of a full sweep over those records, stored as one."""
    reporter(0, None)
    t = time.perf_counter()
    model_m = current(ctx.registry.model(job.model.id), job.model, "model")
    data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
    entry = ctx.store.index(job.index)
    if entry is None or (entry.model, entry.dataset) != (job.model, job.dataset):
        raise RegistryError(f"index {job.index!r} was deleted or is not this model's and dataset's: submit again")
    test = request_rows(job, ctx, model_m, data_m)
    fi = engine(ctx, model_m, data_m, job.method, job.dtype)
    basis = _basis(ctx, entry.basis)
    shards = ctx.warm.keep(("index", entry.id), lambda: shards_of(ctx, entry.basis, entry.shards, data_m))
    reporter.timing.load_s = time.perf_counter() - t

    t = time.perf_counter()
    mirror = fi.mirror(test)
    reporter.timing.mirror_s = time.perf_counter() - t

    t = time.perf_counter()
    queries = fi.config.sign * basis.queries(mirror.first)
    high, low = shards.search(queries.float().cpu().numpy(), job.candidates)
    columns = np.unique(np.concatenate([high.ravel(), low.ravel()]))
    columns = columns[columns >= 0]
    reporter.timing.search_s = time.perf_counter() - t

    t = time.perf_counter()
    fi.prepare(ctx.warm.examples(data_m, columns.tolist()))
    total = fi.train.num_batches() * -(-mirror.test_loss.shape[0] // fi.config.max_param_sets)
    scores = fi.sweep(mirror, lambda done, _t: reporter(done, total)).float()  # (rows, candidates)
    reporter.timing.sweep_s = time.perf_counter() - t
    summary = summarize(job, ctx, fi, mirror, scores, 0, reporter, total, columns)
    summary.index = IndexUse(index=entry.id, candidates=job.candidates, rescored=len(columns), recall=entry.recall)
    return finish(job, ctx, [summary])


def shards_of(ctx: Context, basis: str, shards: list[IndexShard], data_m: DatasetManifest) -> search.Shards:
    """The searchable sketches of the dataset's shards (in its order), from their files in basis' folder."""
    bounds = data_m.bounds
    parts = []
    for n, shard in enumerate(shards):
        path = shard_path(ctx.settings, basis, shard.sha256)
        if not path.is_file():
            raise RegistryError(f"the index's sketches of shard {n} are gone (deleted?): build the index again")
        parts.append((int(bounds[n]), search.load(path.read_bytes())))
    return search.Shards(parts, sum(s.bytes for s in shards))


run, run_part, reduce = entry_points(build_part, catalog, IndexPart, "of the index")
