"""Linear mode without forward-mode autodiff, where every perturbed parameter is a linear layer's.

A linear layer out = a W^T + b (transformers' Conv1D: a W + b) contributes to a training point's
directional derivative along the tangent (dW, db) the term

    sum over its positions t of  delta_t . (dW a_t + db)        delta_t = dL / d out_t

so one forward pass that keeps each such layer's inputs a, and one backward pass to its outputs, give
every tangent's derivative as products with the layer's inputs: no tangent runs through the model (the
jvp's cost per tangent is about two forward passes; here the k tangents together cost about k forward
passes of the layers alone, as one product each, or, with many positions per record, one product with
each record's gradient). It reads delta of record i from the batch's summed loss, which is exact where a
record's loss depends only on its own rows (as the sweep's batching already assumes); the stacking
choice (sweep.py) checks it against the jvp on its probe before using it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from .kronecker import Layer, factored_layers
from .mirror import Functional, Params


def linear_layers(fm: Functional) -> list[Layer] | None:
    """The linear layers (nn.Linear, transformers Conv1D) that own every perturbed parameter, each used by
    no other module (a tied weight reaches the loss elsewhere too); None where some parameter is not such a
    layer's."""
    layers = [
        layer for layer in factored_layers(fm.model, fm.theta)
        if not isinstance(fm.model.get_submodule(layer.module), torch.nn.Conv2d)
    ]  # fmt: skip
    owned = {n for layer in layers for n in (layer.weight, layer.bias) if n}
    params = dict(fm.model.named_parameters())
    uses = Counter(id(p) for _, p in fm.model.named_parameters(remove_duplicate=False))
    shared = any(uses[id(params[n])] > 1 for n in fm.theta)
    return layers if owned == set(fm.theta) and not shared else None


RANK_PROBE = 8  # columns of the range finder that looks for low-rank weight tangents (`weights`)
GRADIENTS_BYTES = 1 << 28  # a batch's per-record gradients of one layer held at most (else the products)


@dataclass
class Weights:
    """A layer's k weight tangents as the sweep multiplies them, (k, out, in): dense, or where all k have
    rank r below RANK_PROBE (a plain gradient step on a record: rank 1 per position; K-FAC's too), as
    factors dW = u v^T, u (k, out, r) and v (k, in, r)."""

    dense: torch.Tensor
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None


def weights(layers: list[Layer], tangents: Params) -> dict[str, Weights]:
    """Each layer's weight tangents (module name -> Weights), factored where their rank is low: a random
    range finder of RANK_PROBE columns (Halko et al. 2011, arXiv 0909.4061) finds the rank r, and the
    factors are kept where they reproduce the tangents to rounding (max(out, in) * eps of their norm, the
    rank rule numpy's matrix_rank uses). Once per query: its cost is about 2 * RANK_PROBE products of the
    layer's weight per test point."""
    out = {}
    for layer in layers:
        dw = tangents[layer.weight]
        dw = dw.transpose(1, 2) if layer.transposed else dw  # (k, out, in)
        k, width, depth = dw.shape
        probe = min(RANK_PROBE, width, depth)
        tol = max(width, depth) * torch.finfo(dw.dtype).eps
        gen = torch.Generator(dw.device).manual_seed(0)
        sketch = dw @ torch.randn(depth, probe, generator=gen, dtype=dw.dtype, device=dw.device)  # (k, out, probe)
        basis, values, _ = torch.linalg.svd(sketch, full_matrices=False)
        rank = max(1, int((values > tol * values[:, :1]).sum(1).max()))
        if rank < probe:
            u = basis[..., :rank]  # (k, out, r)
            v = dw.transpose(1, 2) @ u  # (k, in, r)
            if torch.linalg.matrix_norm(dw - u @ v.transpose(1, 2)).max() <= tol * torch.linalg.matrix_norm(dw).max():
                out[layer.module] = Weights(dw, u, v)
                continue
        out[layer.module] = Weights(dw)
    return out


def derivatives(fm: Functional, task, batch: dict, layers: list[Layer], tangents: Params, kept: dict[str, Weights]):
    """(k, B) directional derivatives of each record's loss along k tangents ((k, *shape) per parameter;
    `kept`: their weights as `weights` gives them), from one forward pass that keeps the layers' inputs and
    one backward pass to their outputs; where the batch carries its loss gradients at a Tail's output
    ("tail_grads", kept by the engine: they depend on the model and the training set alone), from products
    alone. Per layer, the cheapest of three equal sums (FLOPs per record, T positions, k tangents):
    the inputs times each tangent (k T out in), each record's gradient then k dot products ((T + k) out
    in), or the factors (k T r (out + in))."""
    if "tail_grads" in batch:
        seen = [(layers[0], batch["inputs"], batch["tail_grads"])]
    else:
        seen = _backward(fm, task, batch, layers)
    rows = batch["index"].shape[0]
    some = next(iter(tangents.values()))
    total = some.new_zeros(some.shape[0], rows)  # (k, B)
    for layer, a, delta in seen:
        a, delta = a.reshape(rows, -1, a.shape[-1]), delta.reshape(rows, -1, delta.shape[-1])  # (B, T, in), (B, T, out)
        w = kept[layer.module]
        k, width, depth = w.dense.shape
        t = a.shape[1]
        cost = {"products": k * t * width * depth}
        if rows * width * depth * a.element_size() <= GRADIENTS_BYTES:  # (B, out, in) at once
            cost["gradients"] = (t + k) * width * depth
        if w.u is not None:
            cost["factors"] = k * t * w.u.shape[2] * (width + depth)
        way = min(cost, key=cost.get)
        if way == "factors":
            r = w.u.shape[2]
            left = delta @ w.u.permute(1, 0, 2).reshape(width, k * r)  # (B, T, k r)
            right = a @ w.v.permute(1, 0, 2).reshape(depth, k * r)  # (B, T, k r)
            total += (left * right).view(rows, t, k, r).sum((1, 3)).T
        elif way == "products":
            moved = (a @ w.dense.reshape(k * width, depth).T).view(rows, t, k, width)  # (B, T, k, out)
            total += (moved * delta[:, :, None]).sum((1, 3)).T
        else:
            total += torch.einsum("boi,koi->kb", torch.einsum("bto,bti->boi", delta, a), w.dense)
        if layer.bias:
            total += tangents[layer.bias] @ delta.sum(1).T
    return total


def _backward(fm: Functional, task, batch: dict, layers: list[Layer]) -> list[tuple[Layer, torch.Tensor, torch.Tensor]]:
    """(layer, its input, the loss gradient at its output) for each call of each layer over the batch."""
    seen: list[tuple[Layer, torch.Tensor, torch.Tensor]] = []

    def hook(layer):
        def keep(module, args, out):
            out = out if out.requires_grad else out.detach().requires_grad_()  # the first layer's output
            seen.append((layer, args[0].detach(), out))
            return out

        return keep

    handles = [fm.model.get_submodule(layer.module).register_forward_hook(hook(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            losses = task.loss(fm.caller(fm.theta), batch)  # (B,)
            grads = torch.autograd.grad(losses.sum(), [out for _, _, out in seen], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return [(layer, a, g) for (layer, a, out), g in zip(seen, grads, strict=True) if g is not None]


def output_grads(fm: Functional, task, batch: dict) -> torch.Tensor:
    """(B, ..., out) each record's loss gradient at the model's output (for a Tail, its module's, which the
    model returns as it is), from the batch's summed loss."""
    with torch.enable_grad():
        out = task.forward(fm.caller(fm.theta), batch).detach().requires_grad_()
        return torch.autograd.grad(task.criterion(out, batch).sum(), out)[0]
