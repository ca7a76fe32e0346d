"""Sketches of training gradients: the training side of two-stage attribution, computed once per model and
training set, so that a query finds its candidates in an index and re-scores only those exactly.

A record's sketch is x_i = B g_i (g_i: its loss gradient over the perturbed parameters, P of them) and a
query's is q_j = Q d_j (d_j: the mirrored step's tangent), so that x_i . q_j ~ g_i . d_j, the linear-mode
score up to the step's sign. For the default method d_j = lr H^-1 g_j: an influence-function score, which
plain random projections of g_i and d_j approximate badly (most of a gradient's energy lies on H's top
eigenvectors, where H^-1 takes it out again: the score is a small difference of large dot products). So
B and Q split the space along the damped curvature's eigenvectors E (eigenvalues s, largest first):

    B = [ E_r ; R S^-1/2 P ]        Q = [ E_r ; R S^1/2 P ]

E_r: the r top eigenvectors, whose coordinates are kept exactly (where the energy is); P: the projection
on the rest, S: the damped curvature there; R: (k, P) Gaussian with entries N(0, 1/k). The residual term
(R S^-1/2 P g) . (R S^1/2 P d) estimates (P g) . (P d) (Johnson-Lindenstrauss) with its error spread evenly
over the residual's directions (whitened). The split itself is exact for any tangent d, g . d =
(E_r g) . (E_r d) + (P g) . (P d), so a query of another method (another preconditioner, finite mode) is
approximated too, with R's error alone. Curvature without eigenvectors (diagonal, Kronecker, none): r = 0
and S = I, a plain Johnson-Lindenstrauss sketch. Measured (bench.index; docs/benchmarks.md, "Index").
Related: TRAK (arXiv 2303.14186) and LoGra (arXiv 2405.13954) project gradients; here the projection is
only a filter: the candidates are re-scored by the mirrored step exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from .config import AttributionInputError
from .curvature import Curvature, flatten
from .mirror import Functional, Params

__all__ = ["MAX_SKETCH_PARAMS", "Basis", "basis", "project"]

MAX_SKETCH_PARAMS = 1 << 18  # perturbed parameters a sketch takes (B and Q: dims x P float32 each, 512 MB at 256)
GRADIENT_BYTES = 1 << 28  # per-example gradients held at once while sketching (rows x P float32)


@dataclass
class Basis:
    """The sketch's two (D, P) maps over the perturbed parameters `names` (flattened in that order):
    `database` for records' gradients, `query` for the mirrored step's tangents; the first `exact` rows
    are the curvature's top eigenvectors (the same in both)."""

    names: list[str]
    sizes: list[int]  # each parameter's element count
    database: torch.Tensor  # (D, P)
    query: torch.Tensor  # (D, P)
    exact: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"database": self.database, "query": self.query}

    def queries(self, tangents: Params) -> torch.Tensor:
        """(k, D) the sketch of each row's tangent ((k, *shape) per parameter; parameters the tangent does not
        perturb count as 0). Raises AttributionInputError where it perturbs one the basis does not cover."""
        outside = sorted(set(tangents) - set(self.names))
        if outside:
            raise AttributionInputError(
                f"the index sketches the gradients of {len(self.names)} parameters ({', '.join(self.names[:4])}, "
                f"...); this method also perturbs {', '.join(outside[:4])}: use the index's method, or no index"
            )
        like = next(iter(tangents.values()))
        k = like.shape[0]
        flat = torch.cat(
            [
                tangents[n].flatten(1) if n in tangents else like.new_zeros(k, size)
                for n, size in zip(self.names, self.sizes, strict=True)
            ],
            dim=1,
        )
        return flat.to(self.query) @ self.query.T


def basis(curvature: Curvature | None, fm: Functional, dims: int, rank: int, seed: int, device=None) -> Basis:
    """The (dims, P) maps B and Q (module docstring) for the perturbed parameters of `fm`: the curvature's
    min(rank, dims - 1) top eigenvectors where it has them (low-rank and exact Hessians), then a whitened
    Gaussian sketch of the rest, seeded by `seed` (the same basis on every worker)."""
    names = list(fm.theta)
    sizes = [fm.theta[n].numel() for n in names]
    size = sum(sizes)
    if size > MAX_SKETCH_PARAMS:
        raise AttributionInputError(
            f"an index sketches per-record gradients of at most {MAX_SKETCH_PARAMS} perturbed parameters; this "
            f"method perturbs {size}: choose fewer with method.params (e.g. the last layer)"
        )
    if not 1 < dims:
        raise AttributionInputError(f"an index needs dims >= 2, not {dims}")
    vectors, values, floor = _spectrum(curvature, names)
    gen = torch.Generator().manual_seed(seed)
    r = min(rank, dims - 1, 0 if vectors is None else len(vectors))
    k = dims - r
    sketch = torch.randn(k, size, generator=gen, dtype=torch.float64) / k**0.5  # (k, P)
    if vectors is None:
        database = query = sketch
    else:
        top, rest, s = vectors[:r], vectors[r:], values[r:]
        on_rest = sketch @ rest.T  # (k, m - r): the directions with their own curvature
        whiten = sketch / floor**0.5 + (on_rest * (s.rsqrt() - floor**-0.5)) @ rest  # R S^-1/2
        colour = sketch * floor**0.5 + (on_rest * (s.sqrt() - floor**0.5)) @ rest  # R S^1/2

        def without_top(m: torch.Tensor) -> torch.Tensor:  # m P: the top eigenvectors' span removed
            return m - (m @ top.T) @ top

        database = torch.cat([top, without_top(whiten)])
        query = torch.cat([top, without_top(colour)])
    return Basis(names, sizes, database.float().to(device), query.float().to(device), r)


def _spectrum(curvature: Curvature | None, names: list[str]):
    """(eigenvectors (m, P) float64, damped eigenvalues (m,) descending, the damped value of every other
    direction), or (None, None, None) where the curvature has no eigenvectors."""
    if curvature is None or curvature.kind not in ("lowrank", "hessian") or curvature.names != names:
        return None, None, None
    if curvature.kind == "lowrank":
        vectors = curvature.vectors.double().cpu()
        values = 1 / (curvature.factor.double().cpu() + 1 / curvature.damping)  # factor = 1/(l + d) - 1/d
        floor = curvature.damping
    else:  # the Cholesky factor of the damped (clipped) Hessian
        factor = curvature.factor.double().cpu()
        values, vectors = torch.linalg.eigh(factor @ factor.T)
        vectors, floor = vectors.T, float(values.min())
    order = values.argsort(descending=True)
    return vectors[order], values[order], float(floor)


def project(fm: Functional, task, batches: Iterable[dict], basis: Basis, progress=None) -> torch.Tensor:
    """(N, D) B g_i for every record of the batches (task-prepared, on the device), in their order: each
    record's loss gradient over fm's parameters (torch.func, per example), times the basis' `database`."""
    names = list(fm.theta)
    if names != basis.names:
        raise AttributionInputError("the basis was made for other parameters than the engine perturbs")

    def example_loss(params, example):
        return task.loss(fm.caller(params), {k: v.unsqueeze(0) for k, v in example.items()})[0]

    gradients = vmap(grad(example_loss), in_dims=(None, 0))
    rows = max(1, GRADIENT_BYTES // (4 * basis.database.shape[1]))
    database = basis.database.to(next(iter(fm.theta.values())))
    out = []
    for done, batch in enumerate(batches, 1):
        for lo in range(0, batch["inputs"].shape[0], rows):
            part = {key: value[lo : lo + rows] for key, value in batch.items()}
            out.append(flatten(gradients(fm.theta, part), names) @ database.T)  # (rows, P) @ (P, D)
        if progress:
            progress(done, None)
    return torch.cat(out)
