"""Whole-test-set leakage through the index: any number of test points, fanned out in parts of rows.

The index keeps, beside each shard's gradient sketches, an embedding of its records' inputs (float
vectors, or the text a model reads): the unit vectors whose inner products are the leakage analysis'
input similarity (worker/analyses/similarity.py; images as they are, other vectors standardized by a
sample's spread, text as hashed character trigrams), projected to EMBED_DIMS dimensions where they have
more. A copy of a test point is as similar as can be, a near duplicate nearly so; so each test point's
candidates are the LEAKAGE_CANDIDATES (contract/indexes.py) records most similar to it (to each of its small re-alignments, for images),
and each is then confirmed as the analysis confirms any record: its response to the test point's mirrored
step (the copy rule's distance, ForwardInf.paired) and its exact similarity. The thresholds are calibrated
as the full analysis does, on training records used as queries, each through its own candidates.

    run_part(payload, first, stop)   rows [first, stop) of (test points, then calibration records): their
                                     candidates, distances and similarities (the part's summary)
    reduce(payload)                  the calibration and every test point's verdict (analyses.answer)
    run(payload)                     both, in one job

Models whose inputs are token ids without text have no embedding: their leakage analyses sweep in full.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from safetensors.torch import load_file, save

from contract.indexes import embedding_path, inputs_path
from contract.jobs import InlinePoints, LeakageJob
from contract.registry import DatasetManifest, ModelManifest, RegistryError
from contract.results import Candidate, Confirmed, LeakagePart, StoredAnalysis
from contract.schemas import IndexUse, Progress, Timing

from . import search
from .analyses.evidence import EVIDENCE, distance
from .analyses.leakage import NULL_QUERIES, answer, copy_account, near_account
from .analyses.similarity import Similarity, aligned, text_profile, text_variants, variants
from .forward_inf.data import spread
from .jobs import (
    Context,
    Reporter,
    calibration_records,
    current,
    echoed,
    engine,
    entry_points,
    execution,
    request_rows,
)
from .store import claim, write_aside

EMBED_DIMS = 256  # an input embedding's dimensions at most (a random projection of more)
EMBED_SAMPLE = 20_000  # records whose spread standardizes vectors' features (Similarity's mean and std)
CHUNK_ROWS = 256  # test points confirmed together (their mirrored steps, candidates and records in memory)


def embeds(model_m: ModelManifest) -> bool:
    """Whether the leakage analysis compares this model's inputs (float vectors, or the text it reads)."""
    return model_m.input.dtype == "float32" or model_m.input.text is not None


# -- the embedding: made at build time, beside the basis ---------------------------------------------------
class Embedding:
    """Records' inputs as unit vectors whose inner products approximate Similarity's (before re-alignment)."""

    def __init__(self, similar: Similarity, projection: torch.Tensor | None):
        self.similar, self.projection = similar, projection

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """(n, D) float32 embeddings of n inputs (vectors, or text profiles), as compared."""
        return self.unit(self.similar.scaled(x))

    def unit(self, v: torch.Tensor) -> np.ndarray:
        v = v - v.mean(-1, keepdim=True)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (v if self.projection is None else v @ self.projection).float().numpy()

    def views(self, x: torch.Tensor) -> np.ndarray:
        """(A, n, D): the embeddings of each input's re-alignments (images; else the input alone)."""
        scaled = self.similar.scaled(x)
        return np.stack([self.unit(v) for v in aligned(scaled, self.similar.image_shape)])


def inputs_of(model_m: ModelManifest, rows: dict) -> torch.Tensor:
    """The inputs the analysis compares: the vectors, or the text profiles of the token ids."""
    if model_m.input.dtype == "float32":
        return rows["inputs"].flatten(1).float().cpu()
    pad = model_m.input.pad_id
    texts = [model_m.decode([int(t) for t in ids if t != pad]) for ids in rows["inputs"].tolist()]
    return text_profile(texts)


def embedding(ctx: Context, basis: str, model_m: ModelManifest, data_m: DatasetManifest) -> Embedding:
    """The index's input embedding: the sample's spread (vectors), the projection, kept in the basis folder
    (made once across the fleet; a new version of the dataset adopts it with the basis)."""
    path = embedding_path(ctx.settings, basis)

    def make() -> None:
        sample = inputs_of(model_m, ctx.warm.examples(data_m, spread(data_m.size, EMBED_SAMPLE).tolist()))
        standardize = model_m.input.dtype == "float32" and not model_m.input.image_shape
        similar = Similarity(sample, model_m.input.image_shape, standardize=standardize)
        zero = torch.zeros(sample.shape[1])
        arrays = {"mean": zero + similar.mean, "std": zero + similar.std}
        if sample.shape[1] > EMBED_DIMS:  # Johnson-Lindenstrauss: inner products of unit vectors kept
            gen = torch.Generator().manual_seed(0)
            arrays["projection"] = torch.randn(sample.shape[1], EMBED_DIMS, generator=gen) / EMBED_DIMS**0.5
        write_aside(path, lambda f: f.write(save({k: v.contiguous() for k, v in arrays.items()})))

    def load() -> Embedding:
        ctx.store.once(f"index-inputs-{basis}", make, path.is_file)
        arrays = load_file(path)
        similar = Similarity.of_spread(arrays["mean"], arrays["std"], model_m.input.image_shape)
        return Embedding(similar, arrays.get("projection"))

    return ctx.warm.keep(("index-embedding", basis), load)


def embed_shard(ctx: Context, basis: str, model_m: ModelManifest, data_m: DatasetManifest, n: int) -> int:
    """Write shard n's input embedding (its FAISS file) unless the basis holds it; returns its bytes."""
    path = inputs_path(ctx.settings, basis, data_m.shards[n].sha256)
    if not claim(path):
        embed = embedding(ctx, basis, model_m, data_m)
        vectors = np.concatenate(
            [embed(inputs_of(model_m, {k: torch.from_numpy(v) for k, v in rows.items()})) for rows in
             data_m.batches(n, 4096)]
        )  # fmt: skip
        index = search.make(vectors)
        write_aside(path, lambda f: f.write(search.dump(index)))
    return path.stat().st_size


# -- the analysis ---------------------------------------------------------------------------------------
def rows_of(job: LeakageJob, data_m: DatasetManifest) -> int:
    """Rows of the analysis: its test points, then the training records that calibrate its thresholds."""
    points = job.points
    return len(points.inputs if isinstance(points, InlinePoints) else points.indices) + len(
        calibration_records(job, data_m)
    )


class Searcher:
    """The index's input embeddings of every shard, with each row's candidates."""

    def __init__(self, ctx: Context, job: LeakageJob, model_m: ModelManifest, data_m: DatasetManifest):
        entry = ctx.store.index(job.index)
        if entry is None or (entry.model, entry.dataset) != (job.model, job.dataset):
            raise RegistryError(f"index {job.index!r} was deleted or is not this model's and dataset's: submit again")
        self.entry, self.embed = entry, embedding(ctx, entry.basis, model_m, data_m)

        def load() -> search.Shards:
            bounds, parts, size = data_m.bounds, [], 0
            for n, shard in enumerate(entry.shards):
                path = inputs_path(ctx.settings, entry.basis, shard.sha256)
                if not path.is_file():
                    raise RegistryError(f"index {entry.id!r} holds no input embedding of shard {n}: build it again")
                parts.append((int(bounds[n]), search.load(path.read_bytes())))
                size += path.stat().st_size
            return search.Shards(parts, size)

        self.shards = ctx.warm.keep(("index-embeddings", entry.id), load)

    def candidates(self, x: torch.Tensor, count: int) -> list[list[int]]:
        """Each input's `count` most similar records for each of its re-alignments, their union."""
        views = self.embed.views(x)  # (A, n, D)
        found = [self.shards.search(view, count)[0] for view in views]  # the largest inner products
        return [sorted({int(i) for f in found for i in f[j] if i >= 0}) for j in range(len(x))]


def confirm(job: LeakageJob, ctx: Context, reporter: Reporter, first: int, stop: int) -> LeakagePart:
    """Rows [first, stop), CHUNK_ROWS at a time: each one's candidates, its distance to each (the copy rule's,
    from the model's response to its mirrored step and the losses) and their exact input similarity; for a
    calibration record, also its distance to itself and to its nearest other record (the copy rule's noise
    and chance)."""
    reporter(0, None)
    model_m = current(ctx.registry.model(job.model.id), job.model, "model")
    data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
    searcher = Searcher(ctx, job, model_m, data_m)
    fi = engine(ctx, model_m, data_m, job.method, job.dtype)
    every = request_rows(job, ctx, model_m, data_m)
    calibration = calibration_records(job, data_m).tolist()
    n_tests = rows_of(job, data_m) - len(calibration)
    out, rescored = [], 0
    for lo in range(first, stop, CHUNK_ROWS):
        hi = min(stop, lo + CHUNK_ROWS)
        rows = {k: v[lo:hi] for k, v in every.items()}
        own = [calibration[i - n_tests] if i >= n_tests else None for i in range(lo, hi)]
        x = inputs_of(model_m, rows)
        found = searcher.candidates(x, job.candidates)
        found = [f if o is None or o in f else [o, *f] for f, o in zip(found, own, strict=True)]  # itself: the noise
        width = max(len(f) for f in found)
        ids = torch.tensor([f + [f[0]] * (width - len(f)) for f in found])  # padded with a repeat, masked below
        mask = torch.arange(width)[None] < torch.tensor([len(f) for f in found])[:, None]
        records = ctx.warm.examples(data_m, ids.flatten().tolist())
        mirror = fi.mirror(rows)
        scores = fi.paired(mirror, records, width)
        base = fi.losses(records).reshape(ids.shape)
        dist = distance(scores.double(), mirror.self_score.double().cpu(), base.double(),
                        mirror.test_loss.double().cpu()).masked_fill(~mask, math.inf)  # fmt: skip
        similarity = searcher.embed.similar.pairs(x.repeat_interleave(width, 0), inputs_of(model_m, records))
        similarity = similarity.reshape(ids.shape).masked_fill(~mask, -math.inf)
        k = min(EVIDENCE, width)
        for j, o in enumerate(own):
            chosen = set(dist[j].topk(k, largest=False).indices.tolist()) | set(similarity[j].topk(k).indices.tolist())
            matches = [Candidate(index=int(ids[j, c]), distance=float(dist[j, c]), similarity=float(similarity[j, c]))
                       for c in sorted(chosen) if mask[j, c]]  # fmt: skip
            row = Confirmed(matches=matches)
            if o is not None:
                itself = ids[j] == o
                row.itself = float(dist[j][itself].min())
                row.nearest_other = float(dist[j][~itself].min())  # inf where it has no other candidate
            out.append(row)
        rescored += int(mask.sum())
        reporter(hi - first, stop - first)
    reporter(stop - first, stop - first, force=True)
    return LeakagePart(first=first, rows=out, rescored=rescored, execution=execution(fi, job, mirror))


def verdict(job: LeakageJob, ctx: Context, parts: list[LeakagePart]) -> dict:
    """The calibration (copy rule from the calibration rows, near-duplicate rule from the null: training
    records spread over the set, each against its candidates) and each test point's verdict; stored."""
    model_m = current(ctx.registry.model(job.model.id), job.model, "model")
    data_m = current(ctx.registry.dataset(job.dataset.id), job.dataset, "dataset")
    parts = sorted(parts, key=lambda p: p.first)
    rows = [r for part in parts for r in part.rows]
    calibration = calibration_records(job, data_m)
    n = len(rows) - len(calibration)
    calib = rows[n:]
    account, false_flags = copy_account(
        torch.tensor([r.itself for r in calib]), torch.tensor([r.nearest_other for r in calib])
    )
    searcher = Searcher(ctx, job, model_m, data_m)
    nulls = spread(data_m.size, NULL_QUERIES)
    originals = inputs_of(model_m, ctx.warm.examples(data_m, nulls.tolist()))
    null = []
    for own, found in zip(nulls.tolist(), searcher.candidates(originals, job.candidates), strict=True):
        others = [i for i in found if i != own]
        if not others:
            null.append(-math.inf)
            continue
        theirs = inputs_of(model_m, ctx.warm.examples(data_m, others))
        own_row = originals[len(null)][None].expand(len(others), -1)
        null.append(float(searcher.embed.similar.pairs(own_row, theirs).max()))
    if model_m.input.dtype == "float32":
        lo, hi = model_m.input.range or (float(originals.min()), float(originals.max()))
        changes = variants(originals, model_m.input.image_shape, lo, hi)
        how = (
            "the largest Pearson correlation over shifts and a zoom"
            if model_m.input.image_shape
            else "standardized features"
        )
    else:
        texts = [model_m.decode([int(t) for t in r if t != model_m.input.pad_id]) for r in
                 ctx.warm.examples(data_m, nulls.tolist())["inputs"].tolist()]  # fmt: skip
        changes, how = {k: text_profile(v) for k, v in text_variants(texts).items()}, "hashed character trigrams"
    near, near_flags = near_account(searcher.embed.similar, torch.tensor(null), originals, changes,
                                    job.false_flag_rate, how)  # fmt: skip
    account |= near
    account["expected_false_flag_rate"] = false_flags + near_flags
    record_ids = ctx.warm.record_ids(data_m)
    matches = [[{**m.model_dump(), "record_id": record_ids[m.index]} for m in r.matches] for r in rows[:n]]
    use = IndexUse(index=job.index, candidates=job.candidates, rescored=sum(p.rescored for p in parts),
                   recall=searcher.entry.recall)  # fmt: skip
    result = StoredAnalysis(
        job=job,
        execution=parts[0].execution,
        progress=Progress(done=len(parts), total=len(parts), unit="parts", eta_s=0.0),
        blocks=[],
        columns=[],  # no score matrix: each row's candidates alone were scored
        shape=(n, data_m.size),
        timing=Timing(),
        analysis=answer(echoed(ctx, job.points), matches, account, use),
    )
    ctx.store.put_result(job.key, result)
    return {"key": job.key, "shape": list(result.shape), "parts": len(parts)}


# parts of rows (the API's last part: the calibration rows, at most so many)
run, run_part, reduce = entry_points(confirm, verdict, LeakagePart, "of the test points", rows_of)
