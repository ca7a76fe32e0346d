"""The forward sweep: every training point's loss under k perturbed parameter sets, batch by batch.

    finite:  score[j, i] = sign * (L(theta + total_j; z_i) - L(theta; z_i))
    linear:  score[j, i] = sign * d/de L(theta + e * first_j; z_i) at e = 0     (torch.func.jvp)

The k parameter sets are swept together with vmap, so each training batch is read once per group of
test points; with k = 1 the model runs unbatched (vmap adds nothing there). The base losses
L(theta; z_i) depend only on the model and the training set: ForwardInf.prepare computes them once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.func import jvp, vmap

from .mirror import Functional, Params

Progress = Callable[[int, int | None], None]
PreparedBatches = Iterable[dict]


def sweep(
    fm: Functional,
    task,
    batches: PreparedBatches,
    deltas: Params,
    mode: str,
    base: torch.Tensor | None,
    sign: float,
    progress: Progress | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """(k, N) scores of every training point for k parameter-set deltas ((k, *shape) each)."""
    k = next(iter(deltas.values())).shape[0]
    if mode == "finite":
        perturbed = {n: fm.theta[n] + d for n, d in deltas.items()}  # (k, *shape)

        def losses(batch):  # (k, B) loss changes
            if k == 1:
                new = task.loss(fm.caller({n: p[0] for n, p in perturbed.items()}), batch)[None]
            else:
                new = vmap(lambda p: task.loss(fm.caller(p), batch))(perturbed)
            return new - base[batch["index"]]
    else:

        def losses(batch):  # (k, B) directional derivatives
            def along(tangent):
                return jvp(lambda p: task.loss(fm.caller(p), batch), (fm.theta,), (tangent,))[1]

            if k == 1:
                return along({n: d[0] for n, d in deltas.items()})[None]
            return vmap(along)(deltas)

    out = []
    with torch.no_grad():
        for done, batch in enumerate(batches, 1):
            out.append(sign * losses(batch))
            if progress:
                progress(done, total)
    return torch.cat(out, dim=1)
