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
  - "lowrank": the same exact Hessian's top eigenpairs, by a Nystrom approximation H ~ Y^T (Q Y^T)^+ Y on the
    range Q of random directions mapped once through Hessian-vector products, Y = Q H: two products per basis
    vector (Rayleigh-Ritz on the same range, one power step, took three: Halko, Martinsson & Tropp 2011, arXiv
    0909.4061; without the power step 4 random starts on breast_cancer gave LDS 0.394-0.417 for the exact
    Hessian's 0.422, with it 0.421-0.423, with Nystrom 0.422 from the first). The core is truncated to its 3/4
    largest eigenvalues (the last quarter is oversampling), which keeps it stable on an indefinite Hessian;
    where an eigenvalue still comes out past NYSTROM_GUARD x |Q H| (spurious: a cancelling core inverted),
    Rayleigh-Ritz on the same range is taken instead, and said. The basis is doubled until the eigenvalues
    left out are estimated below LOWRANK_TOLERANCE x damping (the smallest kept). The rest of the spectrum is
    taken as 0 under the damping, H^-1 g = g / d + V ((1 / (l + d) - 1 / d) V^T g): a left-out eigenvalue l
    gets 1 / d for 1 / (l + d), off by l / d at most. On the digits MLP 18 of 4,810 eigenvalues exceed the
    damping: 256 products instead of 4,810, the same LDS (docs/benchmarks.md). Where the basis would pass a
    quarter of the parameters (or LOWRANK_MAX_RANK), it is the exact Hessian after all (within
    MAX_HESSIAN_PARAMS; beyond, the estimate is reported). Under precondition="auto" with damping
    "auto" the basis stops where H is proven to have an eigenvalue below -damping (`Indefinite`; the
    engine then takes EK-FAC).
  - "diag": the diagonal empirical Fisher, mean_i g_i^2, plus damping (one pass of per-example
    gradients over the training set, once).

Damping "auto" (`auto_damping`): the weight decay the model was trained with, read off the model itself
(at an optimum of loss + lambda/2 |W|^2 the mean loss gradient is -lambda W), and for the exact Hessian
and the diagonal only the floor on parameters that were not decayed (an unregularised bias); for models
not at such an optimum, the measured best of two rules per curvature kind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch.func import grad, jvp, vmap

from .config import AttributionInputError
from .mirror import Functional, Params

if TYPE_CHECKING:
    from .kronecker import Kronecker

MAX_HESSIAN_PARAMS = 20_000
DAMPING_FLOOR = 1e-3  # damping "auto": at least this fraction of the curvature's mean eigenvalue
DAMPING_DEFAULT = 1e-2  # damping "auto" for an exact Hessian or diagonal of a model not at an L2 optimum
AT_OPTIMUM = 0.99  # damping "auto": the gradient's cosine with -W that marks an L2 optimum
HVP_CHUNKS = (16, 1024)  # Hessian-vector products vmapped per call: the first, and the most (products)
LOWRANK_START = 32  # "lowrank": the first basis of random directions, doubled while the criterion fails
LOWRANK_TOLERANCE = 0.1  # "lowrank": eigenvalues left out below this fraction of the damping
LOWRANK_MAX_RANK = 1024  # "lowrank": the largest basis before the exact Hessian (or the estimate as it is)
NYSTROM_GUARD = 1.5  # "lowrank": Nystrom refused where an eigenvalue passes this x |Q H| (see top_eigen)


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
    `factor` (the Cholesky factor of the damped Hessian, the damped diagonal, or for "lowrank" the
    weights 1 / (l + d) - 1 / d of its eigenvectors) is computed from `raw`; one saved before may be given
    instead (with its `clipped`), and `raw` left empty. "lowrank": `raw` holds the (k,) eigenvalues,
    `vectors` the (k, P) orthonormal eigenvectors, `left_out` the estimated largest eigenvalue left out."""

    kind: str
    names: list[str]
    raw: torch.Tensor  # (P, P) Hessian, (P,) Fisher diagonal or (k,) eigenvalues, undamped
    damping: float | None  # None: not factored yet (see damped)
    samples: int = 0
    factor: torch.Tensor | None = None
    clipped: int = 0
    rule: str = ""  # damping "auto": how auto_damping chose it; "" = as given
    vectors: torch.Tensor | None = None  # "lowrank": (k, P)
    left_out: float = 0.0  # "lowrank": the largest eigenvalue left out, estimated (0: none)
    refused: bool = False  # "lowrank": the Nystrom estimate refused, Rayleigh-Ritz's taken (top_eigen)
    free: torch.Tensor | None = None  # "hessian", "diag": (P,) bool, not decayed in training: damped at the floor

    def __post_init__(self):
        if self.factor is not None or self.damping is None:
            return
        if self.kind == "lowrank":
            if not self.damping > 0:
                raise AttributionInputError("precondition='lowrank' needs damping > 0 (it stands for the spectrum "
                                            "left out)")  # fmt: skip
            self.clipped = int((self.raw < 0).sum())
            self.factor = 1 / (self.raw.clamp_min(0) + self.damping) - 1 / self.damping
        elif self.kind == "hessian":
            shift = torch.diag(self._shift())
            factor, info = torch.linalg.cholesky_ex(self.raw + shift)
            if info:  # a non-convex model: keep the positive part of the spectrum (then damp)
                values, vectors = torch.linalg.eigh(self.raw)
                self.clipped = int((values < 0).sum())
                psd = (vectors * values.clamp_min(0)) @ vectors.T
                factor, info = torch.linalg.cholesky_ex(psd + shift)
            if info:
                raise AttributionInputError(
                    f"the damped Hessian is singular (damping={self.damping} and a zero eigenvalue): "
                    "set damping > 0 (e.g. 1e-3)"
                )
            self.factor = factor
        else:
            if not (self.raw + self._shift()).gt(0).all():
                raise AttributionInputError(
                    f"the damped Fisher diagonal has zeros (damping={self.damping}): set damping > 0 (e.g. 1e-3)"
                )
            self.factor = self.raw + self._shift()

    def _shift(self) -> torch.Tensor:
        """(P,) the damping per parameter: `damping`, and the floor where `free`."""
        size = self.raw.shape[0]
        shift = torch.full((size,), self.damping, dtype=self.raw.dtype, device=self.raw.device)
        return shift if self.free is None else shift.masked_fill(self.free, floored(0.0, self))

    def damped(self, damping: float, rule: str = "", free: torch.Tensor | None = None) -> Curvature:
        return replace(self, damping=damping, factor=None, clipped=0, rule=rule, free=free)

    def mean_eigenvalue(self) -> float:
        if self.kind == "lowrank":  # the left-out eigenvalues counted as 0
            return float(self.raw.clamp_min(0).sum() / self.vectors.shape[1])
        diagonal = self.raw.diagonal() if self.kind == "hessian" else self.raw
        return float(diagonal.mean())

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a later process needs to rebuild it (restore): the factor (and eigenvectors), never the raw
        estimate."""
        return {"factor": self.factor} | ({"vectors": self.vectors} if self.vectors is not None else {})

    def solve(self, grads: Params) -> Params:
        """H^-1 g for each row of (k, *shape) gradients."""
        flat = flatten(grads, self.names)  # (k, P)
        wide = flat.to(self.factor.dtype)
        if self.kind == "hessian":
            solved = torch.cholesky_solve(wide.T, self.factor).T
        elif self.kind == "lowrank":
            solved = wide / self.damping + ((wide @ self.vectors.T) * self.factor) @ self.vectors
        else:
            solved = wide / self.factor
        return unflatten(solved.to(flat.dtype), grads, self.names)


# -- the methods: each registers itself under its `precondition` name ---------------------------------------
@dataclass(frozen=True)
class Method:
    """A curvature method. `estimate(fm, task, batches, kind, damping, rank_for, full, definite)`: the
    estimate on prepared batches (not factored while damping is None: then `.damped(d)`; the last three
    are the low-rank basis' options, which other methods ignore); `restore(kind, names, model, tensors,
    damping, samples, clipped, rule, left_out, refused)`: one saved with `.tensors()`, for `model`.
    `factored`: Kronecker factors, so only linear and convolution layers can be stepped; `floor_free`:
    parameters not decayed in training may be damped at the floor alone (auto_damping's `free`)."""

    estimate: Callable
    restore: Callable
    factored: bool = False
    floor_free: bool = False


METHODS: dict[str, Method] = {}  # precondition name -> method; contract.method.Method names the same (a test)


def register(name: str, method: Method) -> None:
    """Add a curvature method (its module calls this on import; forward_inf/__init__.py imports them all)."""
    METHODS[name] = method


def factored(precondition: str) -> bool:
    return precondition in METHODS and METHODS[precondition].factored


def restore(kind: str, names: list[str], model, tensors: dict, damping: float, samples: int, clipped: int, rule: str,
            left_out: float = 0.0, refused: bool = False):  # fmt: skip
    """A curvature saved with `.tensors()` (and its fields), for `model`."""
    return METHODS[kind].restore(kind, names, model, tensors, damping, samples, clipped, rule, left_out, refused)


def _restore(kind, names, model, tensors, damping, samples, clipped, rule, left_out, refused) -> Curvature:
    vectors, factor = tensors.get("vectors"), tensors["factor"]
    return Curvature(kind, names, torch.empty(0), damping, samples, factor, clipped, rule, vectors, left_out, refused)


def auto_damping(fm: Functional, task, batches, kronecker: bool) -> tuple[float, str, list[str]]:
    """(damping, how it was chosen, the parameters not decayed in training), from the mean training-loss
    gradient g over `batches` and the weight matrices W (biases are rarely decayed). At an optimum of
    loss + lambda/2 |W|^2, g = -lambda W: where g points along -W (cosine >= AT_OPTIMUM) lambda = -g . W /
    |W|^2 is the weight decay the model was trained with, and the damping; there, a parameter of another
    shape whose own gradient shows under half that decay (-g_b . b < lambda/2 |b|^2: an undecayed bias,
    g_b ~ 0) is not decayed, and the exact Hessian and diagonal damp it at the floor only (damping it by
    lambda cost the convex leave-one-out Pearson 0.998 -> 0.982, 0.961 -> 0.941, 0.897 -> 0.875 at L2
    1e-2 / 1e-3 / 1e-4; docs/benchmarks.md). Otherwise (Adam without decay, or stopped early: cosines
    0.37 to 0.58 on the bench's networks) Kronecker curvature takes that same ratio, measured the better
    damping there, and the exact Hessian (whole or low-rank) or diagonal DAMPING_DEFAULT (docs/benchmarks.md,
    "Damping"). `floored` then keeps it above a share of the curvature's scale."""
    theta = {n: t.detach().requires_grad_(True) for n, t in fm.theta.items()}
    total, count = {n: torch.zeros_like(t) for n, t in theta.items()}, 0
    for batch in batches:
        loss = task.loss(fm.caller(theta), batch).sum()
        for n, g in zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True):
            total[n] += g.detach()
        count += batch["inputs"].shape[0]
    mean = {n: t.double().flatten() / max(count, 1) for n, t in total.items()}  # the mean gradient
    weights = [n for n, t in fm.theta.items() if t.dim() >= 2]
    g = torch.cat([mean[n] for n in weights])
    w = torch.cat([fm.theta[n].detach().double().flatten() for n in weights])
    cosine = float(-(g @ w) / (g.norm() * w.norm())) if g.norm() * w.norm() > 0 else 0.0
    decay = max(0.0, float(-(g @ w) / (w @ w))) if w.norm() > 0 else 0.0
    if cosine >= AT_OPTIMUM:
        values = {n: fm.theta[n].detach().double().flatten() for n in fm.theta if n not in weights}
        free = [n for n, b in values.items() if float(-(mean[n] @ b)) < decay / 2 * float(b @ b)]
        return decay, f"the weight decay the model was trained with (gradient cosine with -W {cosine:.4f})", free
    if kronecker:
        return decay, f"-g.W/|W|^2 (not at an L2 optimum: gradient cosine with -W {cosine:.2f})", []
    return DAMPING_DEFAULT, f"the default (not at an L2 optimum: gradient cosine with -W {cosine:.2f})", []


def floored(damping: float, curvature: Curvature | Kronecker) -> float:
    """Damping "auto": never below DAMPING_FLOOR x the curvature's mean eigenvalue, nor zero (a flat
    curvature at g.W >= 0)."""
    return max(damping, DAMPING_FLOOR * curvature.mean_eigenvalue()) or DAMPING_DEFAULT


def products(hvp, vectors: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
    """((k, P) hvp of each row of `vectors`; the chunk it settled on). The products are vmapped `chunk`
    at a time, and the chunk doubles while that makes each product >= 10% faster: too few per call repeat
    the forward pass that does not depend on the vector, too many overflow the cache (2 CPU cores: the
    digits MLP is fastest at 32-64, 2x faster than at 256; a CNN's last layer at 128-256)."""
    rows, at, best, growing = [], 0, float("inf"), True
    while at < len(vectors):
        start = time.perf_counter()
        rows.append(vmap(hvp)(vectors[at : at + chunk]))
        if rows[-1].is_cuda:  # CUDA runs asynchronously: time the work, not its launch
            torch.cuda.synchronize(rows[-1].device)
        at += rows[-1].shape[0]
        per = (time.perf_counter() - start) / rows[-1].shape[0]
        if growing and per < 0.9 * best and chunk < HVP_CHUNKS[1]:
            best, chunk = per, chunk * 2
        elif growing:
            growing, chunk = False, chunk if per < best else max(HVP_CHUNKS[0], chunk // 2)
    return torch.cat(rows), chunk


def _unflat(theta: Params, flat: torch.Tensor) -> Params:
    """(P,) parameters flattened in theta's order -> theta's names and shapes."""
    sizes = [t.numel() for t in theta.values()]
    return {n: t.reshape(theta[n].shape) for n, t in zip(theta, flat.split(sizes), strict=True)}


def hessian_products(fm: Functional, task, batches: list[dict]):
    """V (k, P) -> (k, P) float64 on the parameters' device: the mean training loss's Hessian over
    `batches` times each row of V (P: the selected parameters, flattened in fm.theta's order)."""
    flat0 = torch.cat([t.flatten() for t in fm.theta.values()])
    count = sum(batch["inputs"].shape[0] for batch in batches)
    chunk = [HVP_CHUNKS[0]]  # measured on the first call, kept for the next

    def apply(vectors: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(vectors.shape, dtype=torch.float64, device=flat0.device)
        vectors = vectors.to(flat0)  # once, not per batch (the exact Hessian's: P x P)
        for batch in batches:

            def batch_loss(flat, batch=batch):
                return task.loss(fm.caller(_unflat(fm.theta, flat)), batch).sum()

            def hvp(v, batch_loss=batch_loss):
                return jvp(grad(batch_loss), (flat0,), (v,))[1]

            part, chunk[0] = products(hvp, vectors, chunk[0])
            total += part.double()  # accumulated in float64: the matrix is small, its conditioning is not
        return total / count

    return apply


def _orthonormal(rows: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """(k, P) orthonormal rows spanning `rows` with `basis`'s span removed (twice: Gram-Schmidt's rounding)."""
    for _ in range(2):
        if basis is not None:
            rows = rows - (rows @ basis.T) @ basis
        rows = torch.linalg.qr(rows.T).Q.T
    return rows


class Indefinite(Exception):
    """The Hessian has an eigenvalue below -damping: negative curvature that the damping does not cover
    (a model away from a minimum). precondition="auto" then takes EK-FAC instead (ForwardInf)."""


def top_eigen(
    apply, size: int, damping: float, full: bool, definite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float, bool] | None:
    """((r,) eigenvalues, (r, P) eigenvectors, the largest eigenvalue left out (estimated), whether the
    Nystrom estimate was refused) of the symmetric matrix H whose products `apply` gives ("lowrank" in the
    module docstring). `full`: where the basis would grow past a quarter of `size` (or LOWRANK_MAX_RANK),
    None instead (the caller builds the whole matrix). `definite`: raise Indefinite as soon as H is
    shown to have an eigenvalue below -damping (`_certified_lowest`)."""
    gen = torch.Generator().manual_seed(0)
    basis = images = None
    block = LOWRANK_START
    while True:
        probes = torch.randn(block, size, generator=gen, dtype=torch.float64)
        new = _orthonormal(apply(probes), basis)  # the range of H Omega
        basis = new if basis is None else torch.cat([basis, new])
        images = apply(new) if images is None else torch.cat([images, apply(new)])  # (k, P) Y = Q H
        values, vectors = _nystrom(basis, images)
        norm = float(torch.linalg.eigvalsh(images @ images.T)[-1].clamp_min(0)) ** 0.5  # |Q H|, from the k x k Gram
        refused = float(values.abs().max()) > NYSTROM_GUARD * norm
        if refused:  # more than H holds: a near-singular indefinite core, inverted (Rayleigh-Ritz instead)
            vectors = _orthonormal(images, None)  # the range of H Q, as Nystrom's
            projected = vectors @ apply(vectors).T
            values, w = _largest(*torch.linalg.eigh((projected + projected.T) / 2))
            vectors = w.T @ vectors
        if (
            definite
            and float(values.min()) < -damping
            and (lowest := _certified_lowest(apply, vectors[values < -damping])) < -damping
        ):
            raise Indefinite(f"an eigenvalue of at most {lowest:.3g} against damping {damping:.3g}")
        left_out = float(values.abs().min())
        if left_out <= LOWRANK_TOLERANCE * damping:
            return values, vectors, left_out, refused
        if 2 * len(basis) > min(size // 4, LOWRANK_MAX_RANK):
            return None if full else (values, vectors, left_out, refused)
        block = len(basis)


def _certified_lowest(apply, vectors: torch.Tensor) -> float:
    """An upper bound on H's smallest eigenvalue: the smallest eigenvalue of H projected on the span of
    `vectors` (Rayleigh-Ritz: never below H's own), one product per vector. Nystrom's negative
    estimates overshoot (a digits MLP stopped early: -0.093 for a true -0.040, -0.51 for -0.16), so
    they alone do not prove negative curvature; projected on the span of every eigenvector it puts
    below -damping, that MLP's Hessian shows -0.024 at a basis of 128, a wider one's -0.013."""
    span = _orthonormal(vectors, None)
    projected = span @ apply(span).T
    return float(torch.linalg.eigvalsh((projected + projected.T) / 2)[0])


def _nystrom(basis: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenpairs of H ~ Y^T [Q Y^T]_r^+ Y from an orthonormal basis Q (k, P) and its images Y = Q H,
    the core Q H Q^T truncated to its r eigenvalues of largest magnitude (`_largest`): for an indefinite H
    the truncation keeps the core's inverse stable (Nakatsukasa & Park, "Randomized low-rank approximation
    for symmetric indefinite matrices", SIAM J. Matrix Anal. Appl. 2023); exact zeros are not inverted."""
    core = basis @ images.T
    values, w = _largest(*torch.linalg.eigh((core + core.T) / 2))
    q, r = torch.linalg.qr(images.T @ w)  # Y^T W_r = q r: (P, r), (r, r)
    tiny = float(values.abs().max()) * len(values) * torch.finfo(values.dtype).eps
    small = (r * torch.where(values.abs() > tiny, 1 / values, 0)) @ r.T
    values, s = torch.linalg.eigh((small + small.T) / 2)
    return values, (q @ s).T


def _largest(values: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenpairs (values (k,), vectors as w's columns) of the 3k/4 largest eigenvalues in magnitude:
    the basis's last quarter is oversampling."""
    keep = values.abs().argsort(descending=True)[: len(values) - len(values) // 4]
    return values[keep], w[:, keep]


def estimate(fm: Functional, task, batches, kind: str, damping: float | None, rank_for: float | None = None,
             full: bool | None = None, definite: bool = False):  # fmt: skip
    """Mean curvature of the training loss over all training batches (prepared, on the device); not
    factored while `damping` is None (then `.damped(d)`). "lowrank" sizes its basis for `rank_for`
    (default: `damping`), may fall back to the exact Hessian where `full` (None: within
    MAX_HESSIAN_PARAMS) and, where `definite`, raises Indefinite at an eigenvalue below -rank_for."""
    names = list(fm.theta)
    total = sum(fm.theta[n].numel() for n in names)
    if kind == "hessian" and total > MAX_HESSIAN_PARAMS:
        raise AttributionInputError(
            f"precondition='hessian' needs a {total} x {total} matrix; it is limited to {MAX_HESSIAN_PARAMS} "
            "parameters: select fewer with `params` (e.g. the last layer) or use precondition='lowrank' or 'ekfac'"
        )
    batches = list(batches)
    count = sum(batch["inputs"].shape[0] for batch in batches)
    apply = hessian_products(fm, task, batches) if kind in ("hessian", "lowrank") else None
    if kind == "lowrank":
        full = total <= MAX_HESSIAN_PARAMS if full is None else full
        if found := top_eigen(apply, total, rank_for or damping, full, definite):
            values, vectors, left_out, refused = found
            return Curvature(kind, names, values, damping, count, vectors=vectors, left_out=left_out, refused=refused)
        kind = "hessian"  # the basis would cover the whole matrix: the exact Hessian, solved by Cholesky
    if kind == "hessian":
        raw = apply(torch.eye(total, dtype=torch.float64))
        return Curvature(kind, names, (raw + raw.T) / 2, damping, count)  # symmetric up to rounding
    flat0 = torch.cat([fm.theta[n].flatten() for n in names])

    def example_loss(flat, example):
        return task.loss(fm.caller(_unflat(fm.theta, flat)), {k: v.unsqueeze(0) for k, v in example.items()})[0]

    raw = sum(vmap(grad(example_loss), in_dims=(None, 0))(flat0, batch).pow(2).sum(0).double() for batch in batches)
    return Curvature(kind, names, raw.detach() / count, damping, count)  # (P,)


register("hessian", Method(estimate, _restore, floor_free=True))
register("lowrank", Method(estimate, _restore))
register("diag", Method(estimate, _restore, floor_free=True))
