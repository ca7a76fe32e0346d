"""The forward sweep: every training point's loss under k perturbed parameter sets, batch by batch.

    finite:  score[j, i] = sign * (L(theta + total_j; z_i) - L(theta; z_i))
    linear:  score[j, i] = sign * d/de L(theta + e * first_j; z_i) at e = 0     (torch.func.jvp)

The k parameter sets are swept together with vmap, so each training batch is read once per group of
test points; with k = 1 the model runs unbatched (vmap adds nothing there). In linear mode over linear
layers alone the jvp can give way to those layers' terms from one backward pass (layers.py). The base losses
L(theta; z_i) depend only on the model and the training set: ForwardInf.prepare computes them once.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable

import torch
from torch.func import jvp, vmap

from .layers import derivatives, linear_layers, weights
from .mirror import Functional, Params

Progress = Callable[[int, int | None], None]
PreparedBatches = Iterable[dict]


# stacking "auto" times its ways on this share of the first batch: 2 slice passes per way instead of 2 batch
# passes (GPT-2 124M at k = 8 on 2 CPU cores: the choice cost 213.8 s over a batch of 8, docs/benchmarks.md)
PROBE_SHARE = 0.25
AGREE = 1e-3  # the "layers" way's largest difference from the jvp's on the probe, over the jvp's largest value


def _choose(ways: dict[str, Callable], batch: dict, agree: float = AGREE) -> str:
    """The fastest of `ways` on a slice of `batch` (each run once to warm up, then timed), "layers" only
    where it ran and agrees with the jvp ("loop") there: it assumes each record's loss is its own."""
    probe, timings, values = _slice(batch, PROBE_SHARE), {}, {}
    for name, way in ways.items():
        try:
            way(probe)
            start = time.perf_counter()
            values[name] = way(probe)
            timings[name] = time.perf_counter() - start
        except (RuntimeError, IndexError):
            if name != "layers":
                raise
    if "layers" in timings:
        reference = values["loop"]
        if not (values["layers"] - reference).abs().max() <= agree * reference.abs().max():
            del timings["layers"]
    return min(timings, key=timings.get)


def _slice(batch: dict, share: float) -> dict:
    """The first `share` of a prepared batch's records (at least one): each (B, ...) entry cut to them."""
    rows = len(batch["index"])
    n = max(1, round(rows * share))
    return {k: v[:n] if torch.is_tensor(v) and v.dim() and len(v) == rows else v for k, v in batch.items()}


def sweep(
    fm: Functional,
    task,
    batches: PreparedBatches,
    deltas: Params,
    mode: str,
    base: torch.Tensor | None,
    sign: float,
    stacking: str = "auto",
    progress: Progress | None = None,
    autocast: str = "none",
) -> tuple[torch.Tensor, str]:
    """(k, N) scores of every training point for k parameter-set deltas ((k, *shape) each).

    `stacking` says how the k parameter sets meet a batch: "vmap" (one batched forward; wins for small
    models and on GPUs), "loop" (k forwards over the batch while it is in cache; wins for convolutions
    on CPU, whose batched-weight rule is slow), "layers" (linear mode where every perturbed parameter is a
    linear layer's: one forward and one backward pass, then k products per layer, layers.py), or "auto":
    time those that apply on a slice of the first batch (PROBE_SHARE of its records, after a warm-up call
    each) and keep the fastest (so two engines may choose differently: the ways' scores agree to float
    rounding, not bit for bit). A way that does not apply (vmap for one set, layers elsewhere) is "loop".
    `autocast` ("bfloat16", "float16"): every way runs under torch.autocast in that precision (linear
    mode; "layers" must then agree with the jvp to that precision's rounding). Returns the scores and the
    way used.
    """
    k = next(iter(deltas.values())).shape[0]
    if mode == "finite":
        stacked = {n: fm.theta[n] + d for n, d in deltas.items()}  # (k, *shape) perturbed parameters

        def one(params, batch):  # (B,) perturbed losses; the base is subtracted below
            return task.loss(fm.caller(params), batch)

        def one_plain(j, batch):  # the same as a plain forward of the engine's scratch copy of the model
            return task.loss(fm.loaded(row(j)), batch)
    else:
        stacked = deltas

        def one(tangent, batch):  # (B,) directional derivatives along `tangent`
            return jvp(lambda p: task.loss(fm.caller(p), batch), (fm.theta,), (tangent,))[1]

        def one_plain(j, batch):
            return one(row(j), batch)

    def row(j):
        return {n: p[j] for n, p in stacked.items()}

    def by_loop(batch):
        return torch.stack([one_plain(j, batch) for j in range(k)])

    def by_vmap(batch):
        return vmap(one, in_dims=(0, None))(stacked, batch)

    ways = {"loop": by_loop, "vmap": by_vmap} if k > 1 else {"loop": by_loop}  # one set: vmap adds nothing
    if mode == "linear" and (layers := linear_layers(fm)) is not None:
        kept = functools.cache(lambda: weights(layers, stacked))  # factored where their rank is low: once, if used
        ways["layers"] = lambda batch: derivatives(fm, task, batch, layers, stacked, kept())
    if stacking != "auto" and stacking not in ways:
        stacking = "loop"
    full = next(iter(stacked.values())).dtype  # the scores' dtype, whatever the autocast
    if autocast == "none":
        precision, agree = contextlib.nullcontext, AGREE
    else:
        reduced = getattr(torch, autocast)
        precision = functools.partial(torch.autocast, next(iter(stacked.values())).device.type, reduced)
        agree = max(AGREE, 10 * torch.finfo(reduced).eps)
    out = []
    with torch.no_grad():
        for done, batch in enumerate(batches, 1):
            with precision():
                if stacking == "auto":
                    stacking = _choose(ways, batch, agree) if len(ways) > 1 else "loop"
                value = ways[stacking](batch).to(full)  # (k, B)
            if mode == "finite":
                value = value - base[batch["index"]]
            out.append(sign * value)
            if progress:
                progress(done, None)
    return torch.cat(out, dim=1), stacking
