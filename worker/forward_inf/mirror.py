"""The mirrored step: a few optimizer steps on each test point, functionally and batched over test points.

For test point j (or the whole test set in `group` mode) with gradient g_j = grad L(theta; z_j):

    theta'_j = theta + sign * update(g_j)          sign = +1 ascent (unlearn z_j), -1 descent

with update = lr * g (sgd), lr * sign(g) (signsgd), or a fresh Adam's step. No model is copied: the
selected parameters are a dict of tensors, stacked to (k, *shape) for k test points, and per-test-point
gradients come from torch.func.vmap(grad(...)). arXiv 2402.08922, Sec. 3.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch.func import functional_call, grad_and_value, jvp, vmap

from .config import AttributionInputError, MirrorConfig

Params = dict[str, torch.Tensor]


class Functional:
    """A module viewed as a pure function of its selected parameters (name globs)."""

    def __init__(self, model: torch.nn.Module, globs: tuple[str, ...]):
        named = dict(model.named_parameters())
        for glob in globs:
            if not any(fnmatch(name, glob) for name in named):
                raise AttributionInputError(f"parameter glob {glob!r} matches none of {sorted(named)}")
        self.model = model
        self.theta: Params = {n: p.detach() for n, p in named.items() if any(fnmatch(n, g) for g in globs)}
        self.fixed: Params = {n: p.detach() for n, p in named.items() if n not in self.theta}
        self.fixed.update(dict(model.named_buffers()))
        self._scratch: torch.nn.Module | None = None

    def caller(self, params: Params):
        """`call(*args)` = the model's forward under `params` (the selected ones; the rest fixed)."""
        merged = {**self.fixed, **params}
        return lambda *args: functional_call(self.model, merged, args)

    def loaded(self, params: Params) -> torch.nn.Module:
        """A second copy of the model (made once per engine, never per test point) holding `params`:
        sweeping one parameter set over many batches then runs plain forwards, without functional_call's
        per-call reparametrisation (which costs as much as a small model's forward)."""
        if self._scratch is None:
            self._scratch = copy.deepcopy(self.model)
        with torch.no_grad():
            named = dict(self._scratch.named_parameters())
            for name, value in params.items():
                named[name].copy_(value)
        return self._scratch


class Tail(Functional):
    """The perturbed parameters' own module alone, run on its inputs: where those parameters are all of
    one childless module and the model returns that module's output unchanged (a classifier's head),
    each training point's input to it (`capture`) is computed once, and the sweep, the curvature and the
    damping rule then run the module on those inputs instead of the whole model on the records (a
    ResNet's head: a linear layer's work per training point, not the backbone's). Same parameter names
    as the Functional it narrows."""

    def __init__(self, fm: Functional, name: str):
        self.model, self.theta, self.name = fm.model, fm.theta, name
        self.module = fm.model.get_submodule(name)
        self.fixed = {}
        self._scratch = None

    def caller(self, params: Params):
        local = {n.removeprefix(self.name + "."): p for n, p in params.items()}
        return lambda x: functional_call(self.module, local, (x,))

    def loaded(self, params: Params) -> torch.nn.Module:
        if self._scratch is None:
            self._scratch = copy.deepcopy(self.module)
        with torch.no_grad():
            named = dict(self._scratch.named_parameters())
            for name, value in params.items():
                named[name.removeprefix(self.name + ".")].copy_(value)
        return self._scratch

    def capture(self, run) -> torch.Tensor | None:
        """The module's input for each point of a batch, seen while `run()` computes the model's output on
        it, or None where the model does not end in one plain call of the module (called twice, with
        keyword arguments, or its output changed after)."""
        seen = []
        handle = self.module.register_forward_hook(lambda m, args, kwargs, out: seen.append((args, kwargs, out)),
                                                   with_kwargs=True)  # fmt: skip
        try:
            with torch.no_grad():
                out = run()
        finally:
            handle.remove()
        if len(seen) != 1 or seen[0][1] or len(seen[0][0]) != 1 or seen[0][2] is not out:
            return None
        return seen[0][0][0].detach()


@dataclass
class TailInputs:
    """What a Tail's sweep reads per training point, by position: its module's input and, for linear mode
    over a linear module, the loss gradient at its output (layers.py). Both depend on the model and the
    training set alone: computed once (ForwardInf.tail_inputs_of)."""

    inputs: torch.Tensor  # (N, ...)
    grads: torch.Tensor | None = None  # (N, ..., out)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.inputs, self.grads) if t is not None)

    def to(self, device: torch.device, dtype: torch.dtype) -> TailInputs:
        return TailInputs(*(None if t is None else t.to(device, dtype) for t in (self.inputs, self.grads)))

    def rows(self, batch: dict) -> dict:
        """A batch's entries for the Tail: its rows of these (its index is a range, data.Examples: a slice
        takes them as a view where indexing by the tensor would copy them)."""
        rows = slice(int(batch["index"][0]), int(batch["index"][-1]) + 1)
        return {"inputs": self.inputs[rows]} | ({} if self.grads is None else {"tail_grads": self.grads[rows]})


@dataclass
class Mirror:
    """The outcome of the mirrored step(s) for k rows (test points, or 1 in group mode).

    first: (k, *shape) per parameter, the first step's update (the tangent of `linear` mode).
    total: (k, *shape) per parameter, the sum of all updates (theta'_j = theta + total_j).
    test_loss: (k,) loss of each row's test point(s) before the step.
    self_score: (k,) the row's score of its own test point(s) (what an exact duplicate in the
        training set would score): sign * loss change (finite) or directional derivative (linear).
    memorized: (k,) bool, rows whose loss was below `memorized_loss`.
    notes: repairs made to these rows' steps, in words (e.g. memorised rows' gradients normalised).
    predictions: per test point (not per row), what the model predicts before the step, where the task
        has a label (Task.predictions): JSON, as results carry it.
    """

    first: Params
    total: Params
    test_loss: torch.Tensor
    self_score: torch.Tensor
    memorized: torch.Tensor
    notes: tuple[str, ...] = ()
    predictions: list[dict] | None = None


def mirror_step(fm: Functional, task, test: dict, config: MirrorConfig, precondition=None) -> Mirror:
    """Take `config.steps` mirrored steps on each test point of the prepared batch `test`;
    `precondition(grads)` (curvature.Curvature.solve) maps each gradient g to H^-1 g first."""

    def example_loss(params, example):  # one test point, no batch dimension
        return task.loss(fm.caller(params), {k: v.unsqueeze(0) for k, v in example.items()})[0]

    def group_loss(params, batch):
        return task.loss(fm.caller(params), batch).mean()

    row_loss, in_dims, k = (
        (group_loss, (0, None), 1) if config.group else (example_loss, (0, 0), test["inputs"].shape[0])
    )
    grad_fn = vmap(grad_and_value(row_loss), in_dims=in_dims)
    if config.score == "cosine":  # unit gradient per test point (in group mode, their mean): linear mode
        n = test["inputs"].shape[0]

        def grad_fn(params, test):
            rows = {name: p.expand(n, *p.shape[1:]) for name, p in params.items()} if config.group else params
            grads, losses = vmap(grad_and_value(example_loss))(rows, test)
            grads = _scaled(grads, 1.0 / _norms(grads))
            if config.group:
                return {name: g.mean(0, keepdim=True) for name, g in grads.items()}, losses.mean(0, keepdim=True)
            return grads, losses

    params = {n: p.expand(k, *p.shape).clone() for n, p in fm.theta.items()}  # (k, *shape)
    state: dict[str, Params] = {"m": {}, "v": {}}
    first = total = None
    notes = []
    for step in range(1, config.steps + 1):
        grads, losses = grad_fn(params, test)  # (k, *shape), (k,)
        if step == 1:
            test_loss = losses.detach()
            memorized = test_loss < config.memorized_loss
            if config.optimizer == "sgd" and config.safeguard == "normalize" and memorized.any():
                norm = _norms(grads)
                grads = _scaled(grads, torch.where(memorized, 1.0 / norm, torch.ones_like(norm)))
                rows = memorized.nonzero().flatten().tolist()
                notes.append(
                    f"{len(rows)} row(s) (e.g. {rows[:5]}) had a loss below memorized_loss={config.memorized_loss}: "
                    "their gradient was scaled to unit norm before the SGD step (safeguard='normalize')"
                )
        if precondition is not None:
            grads = precondition(grads)
        update = _update(grads, state, step, config)
        params = {n: params[n] + config.sign * update[n] for n in params}
        delta = {n: config.sign * u for n, u in update.items()}
        first = delta if first is None else first
        total = delta if total is None else {n: total[n] + delta[n] for n in total}
    with torch.no_grad():
        if config.mode == "finite":
            own = vmap(row_loss, in_dims=in_dims)(params, test) - test_loss
        else:
            along = vmap(lambda t, x: jvp(lambda q: row_loss(q, x), (fm.theta,), (t,))[1], in_dims=(0, in_dims[1]))
            own = along(first, test)
    return Mirror(first, total, test_loss, config.sign * own, memorized, tuple(notes))


def _norms(grads: Params) -> torch.Tensor:  # (k,) each row's norm over all selected parameters
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values())).clamp_min(1e-30)


def _scaled(grads: Params, scale: torch.Tensor) -> Params:  # row j times scale[j]
    return {n: g * scale.reshape(-1, *[1] * (g.dim() - 1)) for n, g in grads.items()}


def _update(grads: Params, state: dict[str, Params], step: int, config: MirrorConfig) -> Params:
    if config.optimizer == "sgd":
        return {n: config.lr * g for n, g in grads.items()}
    if config.optimizer == "signsgd":
        return {n: config.lr * g.sign() for n, g in grads.items()}
    b1, b2 = config.adam_betas
    out = {}
    for n, g in grads.items():
        m = state["m"][n] = b1 * state["m"].get(n, torch.zeros_like(g)) + (1 - b1) * g
        v = state["v"][n] = b2 * state["v"].get(n, torch.zeros_like(g)) + (1 - b2) * g * g
        out[n] = config.lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + config.adam_eps)
    return out
