"""Curvature-preconditioned mirrored steps: influence-function scores at the cost of a forward sweep.

An influence function scores training point i for test point j as g_i . H^-1 g_j (Koh & Liang,
arXiv 1703.04730), H the (damped) Hessian of the training loss. If the mirrored step is taken along
H^-1 g_j instead of g_j, the forward-mode score along that step (`linear` mode) is exactly
lr * g_i . H^-1 g_j: no per-example gradient of the training set is needed at query time. The
curvature is estimated once per (model, training set) and reused:

  - "hessian": the exact Hessian of the mean training loss over the selected parameters (P x P, built
    from Hessian-vector products), plus damping * I, Cholesky-factored. Where the damped Hessian is not
    positive definite (a non-convex model), its negative eigenvalues are set to 0 first (counted in
    `clipped`, and reported); with damping 0 a singular one is refused.
    For models (or parameter subsets, e.g. params=["head.*"]) of up to `MAX_HESSIAN_PARAMS` parameters.
  - "diag": the diagonal empirical Fisher, mean_i g_i^2, plus damping (one pass of per-example
    gradients over the training set, once).

Damping "auto" (`auto_damping`): the weight decay the model was trained with, read off the model itself
(at an optimum of loss + lambda/2 |W|^2 the mean loss gradient is -lambda W); for models not at such an
optimum, the measured best of two rules per curvature kind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.func import grad, jvp, vmap

from .config import AttributionInputError
from .kronecker import Kronecker
from .mirror import Functional, Params

MAX_HESSIAN_PARAMS = 20_000
DAMPING_FLOOR = 1e-3  # damping "auto": at least this fraction of the curvature's mean eigenvalue
DAMPING_DEFAULT = 1e-2  # damping "auto" for an exact Hessian or diagonal of a model not at an L2 optimum
AT_OPTIMUM = 0.99  # damping "auto": the gradient's cosine with -W that marks an L2 optimum
HVP_CHUNKS = (16, 1024)  # Hessian-vector products vmapped per call: the first, and the most (hessian_rows)


def flatten(params: Params, names: list[str]) -> torch.Tensor:  # (k, *shape) each -> (k, P)
    return torch.cat([params[n].flatten(1) for n in names], dim=1)


def unflatten(flat: torch.Tensor, like: Params, names: list[str]) -> Params:  # (k, P) -> (k, *shape)
    out, at = {}, 0
    for n in names:
        shape = like[n].shape[1:]
        size = shape.numel()
        out[n] = flat[:, at : at + size].reshape(flat.shape[0], *shape)
        at += size
    return out


@dataclass
class Curvature:
    """A damped curvature estimate over the selected parameters (in `names` order), from `samples`
    training points. `clipped`: negative eigenvalues set to 0 before damping (a non-convex model).
    `factor` (the Cholesky factor of the damped Hessian, or the damped diagonal) is computed from `raw`;
    one saved before may be given instead (with its `clipped`), and `raw` left empty."""

    kind: str
    names: list[str]
    raw: torch.Tensor  # (P, P) Hessian or (P,) Fisher diagonal, undamped
    damping: float | None  # None: not factored yet (see damped)
    samples: int = 0
    factor: torch.Tensor | None = None
    clipped: int = 0
    rule: str = ""  # damping "auto": how auto_damping chose it; "" = as given

    def __post_init__(self):
        if self.factor is not None or self.damping is None:
            return
        if self.kind == "hessian":
            eye = torch.eye(self.raw.shape[0], dtype=self.raw.dtype, device=self.raw.device)
            factor, info = torch.linalg.cholesky_ex(self.raw + self.damping * eye)
            if info:  # a non-convex model: keep the positive part of the spectrum (then damp)
                values, vectors = torch.linalg.eigh(self.raw)
                self.clipped = int((values < 0).sum())
                psd = (vectors * values.clamp_min(0)) @ vectors.T
                factor, info = torch.linalg.cholesky_ex(psd + self.damping * eye)
            if info:
                raise AttributionInputError(
                    f"the damped Hessian is singular (damping={self.damping} and a zero eigenvalue): "
                    "set damping > 0 (e.g. 1e-3)"
                )
            self.factor = factor
        else:
            if not (self.raw + self.damping).gt(0).all():
                raise AttributionInputError(
                    f"the damped Fisher diagonal has zeros (damping={self.damping}): set damping > 0 (e.g. 1e-3)"
                )
            self.factor = self.raw + self.damping

    def damped(self, damping: float, rule: str = "") -> Curvature:
        return Curvature(self.kind, self.names, self.raw, damping, self.samples, rule=rule)

    def mean_eigenvalue(self) -> float:
        diagonal = self.raw.diagonal() if self.kind == "hessian" else self.raw
        return float(diagonal.mean())

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a later process needs to rebuild it (restore): the factor, never the raw estimate."""
        return {"factor": self.factor}

    def solve(self, grads: Params) -> Params:
        """H^-1 g for each row of (k, *shape) gradients."""
        flat = flatten(grads, self.names)  # (k, P)
        wide = flat.to(self.factor.dtype)
        if self.kind == "hessian":
            solved = torch.cholesky_solve(wide.T, self.factor).T
        else:
            solved = wide / self.factor
        return unflatten(solved.to(flat.dtype), grads, self.names)


def restore(kind: str, names: list[str], model, tensors: dict, damping: float, samples: int, clipped: int, rule: str):
    """A curvature saved with `.tensors()` (and its fields), for `model`."""
    if kind in ("kfac", "ekfac"):
        return Kronecker.restore(kind, names, model, tensors, damping, samples, rule)
    return Curvature(kind, names, torch.empty(0), damping, samples, tensors["factor"], clipped, rule)


def auto_damping(fm: Functional, task, batches, curvature: Curvature | Kronecker) -> tuple[float, str]:
    """(damping, how it was chosen), from the mean training-loss gradient g over `batches` and the
    weight matrices W (biases are rarely decayed). At an optimum of loss + lambda/2 |W|^2, g = -lambda W: where g points
    along -W (cosine >= AT_OPTIMUM) lambda = -g . W / |W|^2 is the weight decay the model was trained
    with, and the damping. Otherwise (Adam without decay, or stopped early: cosines 0.37 to 0.58 on the
    bench's networks) Kronecker curvature takes that same ratio, measured the better damping there, and
    the exact Hessian or diagonal DAMPING_DEFAULT (docs/benchmarks.md, "Damping"). Never below
    DAMPING_FLOOR x the curvature's mean eigenvalue, nor zero (a flat curvature at g.W >= 0)."""
    weights = [n for n, t in fm.theta.items() if t.dim() >= 2]
    theta = {n: t.detach().requires_grad_(True) for n, t in fm.theta.items()}
    total, count = [torch.zeros_like(theta[n]) for n in weights], 0
    for batch in batches:
        loss = task.loss(fm.caller(theta), batch).sum()
        for acc, g in zip(total, torch.autograd.grad(loss, [theta[n] for n in weights]), strict=True):
            acc += g.detach()
        count += batch["inputs"].shape[0]
    g = torch.cat([t.double().flatten() for t in total]) / max(count, 1)  # the mean gradient
    w = torch.cat([fm.theta[n].detach().double().flatten() for n in weights])
    cosine = float(-(g @ w) / (g.norm() * w.norm())) if g.norm() * w.norm() > 0 else 0.0
    decay = max(0.0, float(-(g @ w) / (w @ w))) if w.norm() > 0 else 0.0
    floor = DAMPING_FLOOR * curvature.mean_eigenvalue()
    if cosine >= AT_OPTIMUM:
        damping, why = decay, f"the weight decay the model was trained with (gradient cosine with -W {cosine:.4f})"
    elif isinstance(curvature, Kronecker):
        damping, why = decay, f"-g.W/|W|^2 (not at an L2 optimum: gradient cosine with -W {cosine:.2f})"
    else:
        damping, why = DAMPING_DEFAULT, f"the default (not at an L2 optimum: gradient cosine with -W {cosine:.2f})"
    return max(damping, floor) or DAMPING_DEFAULT, why


def hessian_rows(hvp, at_point: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
    """(the (P, P) matrix of hvp over the identity's rows, P = at_point's size; the chunk it settled on).
    The products are vmapped `chunk` at a time, and the chunk doubles while that makes each product >= 10%
    faster: too few per call repeat the forward pass that does not depend on the vector, too many overflow
    the cache (2 CPU cores: the digits MLP is fastest at 32-64, 2x faster than at 256; a CNN's last layer
    at 128-256)."""
    eye = torch.eye(at_point.numel(), dtype=at_point.dtype, device=at_point.device)
    rows, at, best, growing = [], 0, float("inf"), True
    while at < len(eye):
        start = time.perf_counter()
        rows.append(vmap(hvp)(eye[at : at + chunk]))
        if rows[-1].is_cuda:  # CUDA runs asynchronously: time the work, not its launch
            torch.cuda.synchronize(rows[-1].device)
        at += rows[-1].shape[0]
        per = (time.perf_counter() - start) / rows[-1].shape[0]
        if growing and per < 0.9 * best and chunk < HVP_CHUNKS[1]:
            best, chunk = per, chunk * 2
        elif growing:
            growing, chunk = False, chunk if per < best else max(HVP_CHUNKS[0], chunk // 2)
    return torch.cat(rows), chunk


def estimate(fm: Functional, task, batches, kind: str, damping: float | None) -> Curvature:
    """Mean curvature of the training loss over all training batches (prepared, on the device); not
    factored while `damping` is None (then `.damped(d)`)."""
    names = list(fm.theta)
    sizes = [fm.theta[n].numel() for n in names]
    total = sum(sizes)
    if kind == "hessian" and total > MAX_HESSIAN_PARAMS:
        raise AttributionInputError(
            f"precondition='hessian' needs a {total} x {total} matrix; it is limited to {MAX_HESSIAN_PARAMS} "
            "parameters: select fewer with `params` (e.g. the last layer) or use precondition='diag'"
        )
    theta = fm.theta

    def unflat(flat):  # (P,) -> params
        return {n: t.reshape(theta[n].shape) for n, t in zip(names, flat.split(sizes), strict=True)}

    flat0 = torch.cat([theta[n].flatten() for n in names])
    acc, count, chunk = None, 0, HVP_CHUNKS[0]
    for batch in batches:
        n = batch["inputs"].shape[0]
        if kind == "hessian":

            def batch_loss(flat, batch=batch):
                return task.loss(fm.caller(unflat(flat)), batch).sum()

            def hvp(v, batch_loss=batch_loss):
                return jvp(grad(batch_loss), (flat0,), (v,))[1]

            part, chunk = hessian_rows(hvp, flat0, chunk)  # (P, P)
        else:

            def example_loss(flat, example):
                return task.loss(fm.caller(unflat(flat)), {k: v.unsqueeze(0) for k, v in example.items()})[0]

            part = vmap(grad(example_loss), in_dims=(None, 0))(flat0, batch).pow(2).sum(0)  # (P,)
        part = part.double()  # accumulated and factored in float64: the matrix is small, its conditioning is not
        acc = part if acc is None else acc + part
        count += n
    raw = acc / count
    if kind == "hessian":
        raw = (raw + raw.T) / 2  # symmetric up to rounding
    return Curvature(kind, names, raw.detach(), damping, count)
