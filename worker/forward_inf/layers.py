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


def derivatives(fm: Functional, task, batch: dict, layers: list[Layer], tangents: Params) -> torch.Tensor:
    """(k, B) directional derivatives of each record's loss along k tangents ((k, *shape) per parameter),
    from one forward pass that keeps the layers' inputs and one backward pass to their outputs; where the
    batch carries its loss gradients at a Tail's output ("tail_grads", kept by the engine: they depend on
    the model and the training set alone), from products alone."""
    if "tail_grads" in batch:
        seen = [(layers[0], batch["inputs"], batch["tail_grads"])]
    else:
        seen = _backward(fm, task, batch, layers)
    rows = batch["index"].shape[0]
    some = next(iter(tangents.values()))
    total = some.new_zeros(some.shape[0], rows)  # (k, B)
    for layer, a, delta in seen:
        a, delta = a.reshape(rows, -1, a.shape[-1]), delta.reshape(rows, -1, delta.shape[-1])  # (B, T, in), (B, T, out)
        dw = tangents[layer.weight]  # (k, out, in), or (k, in, out) transposed
        dw = dw.transpose(1, 2) if layer.transposed else dw
        k, width, depth = dw.shape
        if k * a.shape[1] <= a.shape[1] + k:  # k products with the inputs
            moved = (a @ dw.reshape(k * width, depth).T).view(rows, -1, k, width)  # (B, T, k, out)
            total += torch.einsum("btko,bto->kb", moved, delta)
        else:  # each record's gradient once, then k dot products
            total += torch.einsum("boi,koi->kb", torch.einsum("bto,bti->boi", delta, a), dw)
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
