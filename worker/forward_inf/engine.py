"""`ForwardInf`: prepare a (model, training set) once, then answer attribution queries with a mirrored
step on the test points and one forward sweep over the training set.

    fi = ForwardInf(model, task, MirrorConfig()).prepare(train)   # base losses, computed once
    scores = fi.scores(test)                                       # (n_test, n_train); (1, n_train) in group mode

`attribute(model, task, train, test, config)` is the one-shot form.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.func import jvp, vmap
from torch.utils.flop_counter import FlopCounterMode

from .config import AUTO_HESSIAN_FLOPS, AUTO_HESSIAN_PARAMS, TAIL_INPUTS_BYTES, AttributionInputError, MirrorConfig
from .curvature import (
    LOWRANK_MAX_RANK,
    MAX_HESSIAN_PARAMS,
    METHODS,
    Curvature,
    Indefinite,
    auto_damping,
    factored,
    floored,
)
from .data import Batch, Examples, spread
from .kronecker import Kronecker, factored_layers
from .layers import linear_layers, output_grads
from .mirror import Functional, Mirror, Tail, TailInputs, mirror_step
from .sketch import Basis, basis, project
from .sweep import Progress, sweep
from .tasks import TEST_INDEX_OFFSET, Calibration, Task, fit_calibration

__all__ = ["ForwardInf", "attribute"]
# the curvature each precondition may come back as: a low-rank basis that would cover the whole matrix is the
# exact Hessian (curvature.estimate)
SOLVED_AS = {"lowrank": ("lowrank", "hessian")}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class ForwardInf:
    """Forward-INF over one model and one training set.

    The model is put in eval mode (no dropout noise, no BatchNorm drift) and moved to the config's
    device and dtype, in place.
    """

    def __init__(self, model: torch.nn.Module, task: Task, config: MirrorConfig | None = None):
        self.config = config or MirrorConfig()
        self.task = task
        dtype = getattr(torch, self.config.dtype) if self.config.dtype else None
        self.model = model.eval().to(device=self.config.device, dtype=dtype)
        first = next(iter(self.model.parameters()), None)
        if first is None:
            raise AttributionInputError("the model has no parameters")
        self.device, self.dtype = first.device, first.dtype
        self.fm = Functional(self.model, self.config.params)
        self.train: Examples | None = None
        self.base: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None  # score="cosine": each training point's last-layer gradient norm
        self.curvature: Curvature | Kronecker | None = None
        self.tail: Tail | None = None  # the perturbed module alone, on the training set's inputs to it:
        self.tail_inputs: TailInputs | None = None  # by position (prepare)
        self.precondition = self.config.precondition  # "auto" is resolved by plan(train)
        self._ways: dict[int, str] = {}  # parameter sets per pass -> how they meet a batch ("auto": chosen once)
        self._way = "single"  # the last pass's way, for execution()
        self.notes: list[str] = []  # choices the engine made on its own (plan), in words
        self.exact_fallback: bool | None = None  # "lowrank": may it build the exact Hessian (None: if it fits)

    # -- data ----------------------------------------------------------------------------------------
    def _batches(self, examples: Examples, index_offset: int = 0, validate: bool = True) -> Iterator[Batch]:
        """Batches moved to the device, floating inputs cast to the model's dtype, task-prepared; with
        `validate`, NaN/inf refused (the sweep skips this: prepare() checked the training set)."""
        for batch in examples:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            for key in ("inputs", "targets"):
                value = batch.get(key)
                if value is not None and value.is_floating_point():
                    if validate and not torch.isfinite(value).all():
                        raise AttributionInputError(f"the {examples.what} has NaN or infinite {key}")
                    batch[key] = value.to(self.dtype)
            batch["index"] = batch["index"] + index_offset
            yield self.task.prepare(batch)

    def _checked_forward(self, batch: Batch, what: str) -> torch.Tensor:
        """The model's output on `batch`, or an AttributionInputError naming what does not fit."""
        try:
            out = self.task.forward(self.fm.caller(self.fm.theta), batch)
        except (RuntimeError, IndexError, ValueError, TypeError) as exc:
            if _is_oom(exc):
                raise
            shapes = {k: f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in batch.items()}
            raise AttributionInputError(f"the model cannot process the {what} ({shapes}): {exc}") from exc
        self.task.check(out, batch)
        return out

    # -- the method ----------------------------------------------------------------------------------
    def plan(self, train) -> ForwardInf:
        """Resolve precondition="auto" for this training set (once; prepare() calls it): the low-rank
        Hessian of the perturbed parameters where it is affordable, else, when every parameter is
        perturbed, of the last layer alone (only that layer is then stepped), else EK-FAC, else none.
        Cost: Hessian-vector products per curvature sample, two per basis vector (at most LOWRANK_MAX_RANK),
        three where the Nystrom estimate is refused: priced at min(parameters, 3 x LOWRANK_MAX_RANK), each
        about one forward pass of what the parameters feed (the whole model; for the last layer alone, that
        layer: 2 FLOPs a weight). The exact Hessian, one product per parameter, is its fallback only where
        it is affordable itself (`self.exact_fallback`). The low-rank Hessian's estimate may still turn
        to EK-FAC (estimate_curvature: an eigenvalue below -damping)."""
        if factored(self.precondition):
            self._factored_only()
        if self.precondition != "auto":
            return self
        examples = Examples(train, 1, "training set")
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self._checked_forward(next(self._batches(examples)), examples.what)
        samples = min(self.config.curvature_samples, examples.size() or self.config.curvature_samples)

        def affordable(fm: Functional, flops_per_product: float) -> bool:  # sets exact_fallback where True
            size = sum(p.numel() for p in fm.theta.values())
            cost = samples * flops_per_product  # per product
            self.exact_fallback = size <= AUTO_HESSIAN_PARAMS and size * cost <= AUTO_HESSIAN_FLOPS
            return size <= MAX_HESSIAN_PARAMS and min(size, 3 * LOWRANK_MAX_RANK) * cost <= AUTO_HESSIAN_FLOPS

        last = self._last_module()
        head = Functional(self.model, (f"{last}.*",)) if last else None
        head_factored = head is not None and bool(factored_layers(self.model, list(head.theta)))
        size = sum(p.numel() for p in self.fm.theta.values())
        if affordable(self.fm, counter.get_total_flops()):
            self.precondition = "lowrank"
            self.notes.append(f"precondition='auto' chose the Hessian of the {size} perturbed parameters (low rank)")
        elif (
            self.config.params == ("*",)
            and head_factored
            and affordable(head, 2 * sum(p.numel() for p in head.theta.values()))
        ):
            self.fm, self.precondition = head, "lowrank"
            self.notes.append(
                f"precondition='auto': the Hessian of all {size} parameters is over budget, so the Hessian of "
                f"the last layer ({last!r}) is used and only that layer is perturbed"
            )
        elif factored_layers(self.model, list(self.fm.theta)):
            self.precondition = "ekfac"
            self.notes.append(
                f"precondition='auto': neither the Hessian of the {size} perturbed parameters nor one of a linear "
                "last layer is affordable, so EK-FAC curvature of the perturbed linear and convolution layers is used"
            )
            self._factored_only()
        else:
            self.precondition = "none"
            self.notes.append(
                f"precondition='auto': no affordable Hessian for {size} parameters; the step is not preconditioned"
            )
        return self

    def _factored_only(self) -> None:
        """Kronecker-factored curvature: perturb only the parameters of factored layers (and say which
        were left out)."""
        layers = factored_layers(self.model, list(self.fm.theta))
        kept = [n for layer in layers for n in (layer.weight, layer.bias) if n is not None]
        left = [n for n in self.fm.theta if n not in kept]
        if not kept:
            raise AttributionInputError(
                f"precondition={self.precondition!r} needs linear or convolution layers among the perturbed "
                f"parameters ({', '.join(list(self.fm.theta)[:6])})"
            )
        if left:
            self.fm = Functional(self.model, tuple(kept))
            self.notes.append(
                f"precondition={self.precondition!r}: {len(left)} parameters outside linear and convolution layers "
                f"have no Kronecker factors and are not perturbed ({', '.join(left[:6])}{', ...' if len(left) > 6 else ''})"
            )

    def prepare(
        self,
        train,
        base: torch.Tensor | None = None,
        progress: Progress | None = None,
        norms: torch.Tensor | None = None,
        tail_inputs: TailInputs | None = None,
    ) -> ForwardInf:
        """Bind the training set and compute its base losses once (or adopt `base`, computed before
        for the same model and training set; likewise `norms`, last_layer_norms(train), for
        score="cosine", and `tail_inputs`, tail_inputs(train))."""
        self.plan(train)
        self.train = Examples(train, self.config.batch_size, "training set")
        if tail_inputs is None:
            tail_inputs = self.tail_inputs_of(train)
        self.tail = self._tail() if tail_inputs is not None else None
        self.tail_inputs = tail_inputs.to(self.device, self.dtype) if self.tail is not None else None
        if base is None:
            parts = []
            fm, batches = self._training(validate=True)
            with torch.no_grad():
                for n, batch in enumerate(batches, 1):
                    if n == 1 and self.tail is None:  # the first batch doubles as the check that model and data fit
                        out = self._checked_forward(batch, self.train.what)  # (tail_inputs_of checked it)
                    else:
                        out = self.task.forward(fm.caller(fm.theta), batch)
                    parts.append(self.task.criterion(out, batch))
                    if progress:
                        progress(n, self.train.num_batches())
            base = torch.cat(parts)
        elif self.config.mode == "finite" and not torch.isfinite(base).all():
            raise AttributionInputError("the given base losses are not finite")
        self.base = base.to(self.device, self.dtype)
        if self.config.score == "cosine":
            self.norms = self.last_layer_norms(train) if norms is None else norms.to(self.device, self.dtype)
        if self.precondition != "none" and not self._curvature_fits():
            self.curvature = self.estimate_curvature(train, self.tail_inputs)
        return self

    def execution(self) -> dict:
        """What this engine runs, as plain data: the resolved precondition and perturbed parameters, the
        curvature, stacking (the last pass's way: "single" for one parameter set by the jvp), dtype, device,
        notes."""
        c = self.curvature if self.precondition != "none" else None
        notes = list(self.notes)
        if c is not None and c.clipped:
            notes.append(f"the Hessian had {c.clipped} negative eigenvalues; they were set to 0 before damping")
        if c is not None and (self.precondition, c.kind) == ("lowrank", "hessian"):
            notes.append("low-rank Hessian: a basis leaving out only eigenvalues under a tenth of the damping would "
                         "cover over a quarter of the parameters, so the exact Hessian is used")  # fmt: skip
        if c is not None and c.kind == "lowrank":
            size = c.vectors.shape[1]
            notes.append(
                f"low-rank Hessian: its top {len(c.factor)} of {size} eigenpairs; the rest taken as 0 under the damping"
                + (
                    ""
                    if c.left_out == 0
                    else f" (estimated at most {c.left_out:.3g}, {c.left_out / c.damping:.2g} x the damping)"
                )
                + ("; Rayleigh-Ritz, the Nystrom estimate refused (an eigenvalue past |QH|)" if c.refused else "")
            )
        if c is not None and c.rule:
            notes.append(f"damping 'auto' = {c.damping:.3g}: {c.rule}")
        if self.tail is not None:
            notes.append(
                f"the sweep runs {self.tail.name!r} alone on each training point's input to it (computed once): "
                "the model returns that module's output unchanged"
            )
        return {
            "precondition": self.precondition,
            "parameters": list(self.fm.theta),
            "parameter_count": sum(p.numel() for p in self.fm.theta.values()),
            "curvature": None
            if c is None
            else {"kind": c.kind, "damping": c.damping, "samples": c.samples, "clipped_eigenvalues": c.clipped}
            | ({"rank": len(c.factor)} if c.kind == "lowrank" else {}),
            "stacking": self._way,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "notes": notes,
        }

    def _last_module(self) -> str:
        """The name of the module that owns the model's last parameter ("" for the model itself)."""
        return list(dict(self.model.named_parameters()))[-1].rpartition(".")[0]

    def last_layer_norms(self, train) -> torch.Tensor:
        """(N,) each training point's loss-gradient norm over the last linear layer's weight and bias,
        exactly, from one forward pass (score="cosine" divides by it)."""
        layer = self.model.get_submodule(self._last_module())
        if not isinstance(layer, torch.nn.Linear):
            raise AttributionInputError(
                f"score='cosine' needs a model whose last layer is a torch.nn.Linear, not {type(layer).__name__}"
            )
        examples = Examples(train, self.config.batch_size, "training set")
        return torch.cat([self._layer_norms(layer, batch) for batch in self._batches(examples, validate=False)])

    def _layer_norms(self, layer: torch.nn.Linear, batch: Batch) -> torch.Tensor:
        """(B,) with h the layer's input and r the loss gradient at its output, grad W = r^T h and
        grad b = r (summed over any sequence positions)."""
        seen = {}

        def hook(module, args, out):  # the output becomes a leaf, so the loss gradient stops there
            seen["h"], seen["out"] = args[0].detach(), out.detach().requires_grad_()
            return seen["out"]

        handle = layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                out = self.task.forward(self.fm.caller(self.fm.theta), batch)
                (r,) = torch.autograd.grad(self.task.criterion(out, batch).sum(), seen["out"])
        finally:
            handle.remove()
        h = seen["h"].reshape(r.shape[0], -1, seen["h"].shape[-1])  # (B, T, d), T = 1 without a sequence
        r = r.reshape(r.shape[0], -1, r.shape[-1])  # (B, T, C)
        weight = torch.einsum("btc,btd->bcd", r, h).flatten(1).pow(2).sum(1)
        bias = r.sum(1).pow(2).sum(1) if layer.bias is not None else 0
        return torch.sqrt(weight + bias)

    def _curvature_fits(self) -> bool:
        c = self.curvature
        return (
            c is not None
            and c.kind in SOLVED_AS.get(self.precondition, (self.precondition,))
            and (bool(c.rule) if self.config.damping == "auto" else not c.rule and c.damping == self.config.damping)
            and c.names == list(self.fm.theta)
        )

    def _training(self, validate: bool) -> tuple[Functional, Iterator[Batch]]:
        """What runs over the bound training set: the model on its batches, or the Tail alone on its inputs."""
        batches = self._batches(self.train, validate=validate)
        if self.tail is None:
            return self.fm, batches
        return self.tail, ({**b, **self.tail_inputs.rows(b)} for b in batches)

    def _tail(self) -> Tail | None:
        """The perturbed parameters' module alone, where they are all of one childless module and the task
        feeds the model its inputs as they are (mirror.Tail); else None."""
        owners = {n.rpartition(".")[0] for n in self.fm.theta}
        if len(owners) != 1 or not (name := owners.pop()) or type(self.task).forward is not Task.forward:
            return None
        module = self.model.get_submodule(name)
        mine = {f"{name}.{p}" for p, _ in module.named_parameters()}
        return Tail(self.fm, name) if next(module.children(), None) is None and mine == set(self.fm.theta) else None

    def tail_inputs_of(self, train) -> TailInputs | None:
        """Each training point's input to the perturbed module, by position, from one forward pass, and in
        linear mode over a linear module the loss gradients at its output (prepare() keeps them: the base
        losses and the sweep then run that module alone, or products alone); None where there is no such
        Tail or they would take over TAIL_INPUTS_BYTES."""
        if self.precondition == "auto":
            self.plan(train)
        if (tail := self._tail()) is None:
            return None
        linear = self.config.mode == "linear" and linear_layers(tail) is not None
        parts, grads, order, size = [], [], [], 0
        examples = Examples(train, self.config.batch_size, "training set")
        for n, batch in enumerate(self._batches(examples), 1):
            if n == 1:  # the first batch doubles as the check that model and data fit
                part = tail.capture(lambda batch=batch: self._checked_forward(batch, examples.what))
            else:
                part = tail.capture(lambda batch=batch: self.task.forward(self.fm.caller(self.fm.theta), batch))
            if part is not None and linear:
                grads.append(output_grads(tail, self.task, {**batch, "inputs": part}))
            size += sum(t.numel() * t.element_size() for t in (part, *grads[-1:]) if t is not None)
            if part is None or size > TAIL_INPUTS_BYTES:
                return None
            parts.append(part)
            order.append(batch["index"])
        by_position = torch.cat(order).argsort()
        return TailInputs(torch.cat(parts)[by_position], torch.cat(grads)[by_position] if linear else None)

    def _on_tail(self, batches: list[Batch], inputs: TailInputs | None) -> tuple[Functional, list[Batch]]:
        """(the Functional and the batches to fit curvature on): the Tail on its inputs where there is one,
        taken from `inputs` (the bound training set's, by position) or else captured batch by batch."""
        tail = self._tail()
        if tail is not None and inputs is not None:
            return tail, [{**b, "inputs": inputs.inputs[b["index"]]} for b in batches]
        run = [lambda b=b: self.task.forward(self.fm.caller(self.fm.theta), b) for b in batches]
        captured = [tail.capture(r) for r in run] if tail is not None else [None]
        if any(i is None for i in captured):
            return self.fm, batches
        return tail, [{**b, "inputs": i} for b, i in zip(batches, captured, strict=True)]

    def estimate_curvature(self, train, tail_inputs: TailInputs | None = None) -> Curvature | Kronecker:
        """The damped curvature of the mean training loss (self.precondition, config.damping), from at
        most `config.curvature_samples` training points spread evenly over the set (the exact Hessian
        costs one HVP per parameter per batch). prepare() calls this once when needed; for a training
        set in several parts, pass all of them (a list of batches) and assign the result to
        `self.curvature` before prepare() (or `use` it). `tail_inputs`: train's inputs to the perturbed
        module, where prepare() holds them (the sample then needs no forward pass through the model).
        Where "auto" chose the low-rank Hessian and its own damping, and the Hessian shows an eigenvalue
        below -damping (checked as its basis grows), the model is away from a minimum: the Hessian's
        clipped inverse misleads there and costs an exact Hessian, so EK-FAC is estimated instead, and
        said (on a digits MLP stopped after 20 epochs: LDS 0.392 against 0.380, setup 0.5 s against 40 s;
        docs/benchmarks.md)."""
        self.plan(train)
        examples = Examples(train, max(self.config.batch_size, 2048), "training set")
        limit = self.config.curvature_samples
        size = examples.size()
        chosen = spread(size, limit).to(self.device) if size else None  # unknown size: the first `limit`

        def sample():
            taken = 0
            for batch in self._batches(examples):
                keep = torch.isin(batch["index"], chosen) if chosen is not None else slice(None)
                part = {k: v[keep][: limit - taken] for k, v in batch.items()}
                taken += part["inputs"].shape[0]
                if part["inputs"].shape[0]:
                    yield part
                if taken >= limit:
                    return

        batches = list(sample())
        own = (self.config.precondition, self.config.damping) == ("auto", "auto")  # the damping is the engine's
        definite = own and bool(factored_layers(self.model, list(self.fm.theta)))  # EK-FAC to turn to
        try:
            return self._estimate(*self._on_tail(batches, tail_inputs), definite)
        except Indefinite:
            self._indefinite()
            return self._estimate(*self._on_tail(batches, tail_inputs), False)

    def _indefinite(self) -> None:
        """precondition="auto" found the Hessian it chose indefinite past the damping: EK-FAC instead."""
        self.precondition = "ekfac"
        self.notes.append(
            f"precondition='auto': the Hessian of the {sum(p.numel() for p in self.fm.theta.values())} perturbed "
            "parameters has negative curvature past the damping (a model away from a minimum, where its clipped "
            "inverse misleads), so EK-FAC curvature, positive by construction, is used"
        )
        self._factored_only()

    def use(self, curvature: Curvature | Kronecker) -> None:
        """Adopt a curvature estimated before for these settings (the fleet's stored one); where it is the
        EK-FAC that "auto" took for an indefinite Hessian (estimate_curvature), switch as it did."""
        if self.config.precondition == "auto" and (self.precondition, curvature.kind) == ("lowrank", "ekfac"):
            self._indefinite()
        self.curvature = curvature

    def _estimate(self, fm: Functional, batches: list[Batch], definite: bool) -> Curvature | Kronecker:
        """The damped curvature of self.precondition on `batches` (estimate_curvature)."""
        method, kind = METHODS[self.precondition], self.precondition
        if self.config.damping != "auto":
            return method.estimate(fm, self.task, batches, kind, self.config.damping, full=self.exact_fallback)
        damping, rule, free = auto_damping(fm, self.task, batches, method.factored)  # "lowrank" sizes its basis by it
        curvature = method.estimate(fm, self.task, batches, kind, None, damping, self.exact_fallback, definite)
        if not free or not METHODS[curvature.kind].floor_free:  # a low-rank remainder has one damping
            return curvature.damped(floored(damping, curvature), rule)
        mask = torch.cat([torch.full((fm.theta[n].numel(),), n in free) for n in curvature.names])
        rule += f"; not decayed in training, so damped at the floor only: {', '.join(free)}"
        return curvature.damped(floored(damping, curvature), rule, mask.to(curvature.raw.device))

    def mirror(self, test) -> Mirror:
        """The mirrored step(s) on the test points (all of them at once)."""
        examples = Examples(test, 1 << 62, "test set")
        batch = next(self._batches(examples, TEST_INDEX_OFFSET))
        with torch.no_grad():
            out = self._checked_forward(batch, examples.what)
        if self.precondition != "none" and not self._curvature_fits():
            raise AttributionInputError("precondition is set: call prepare(train) first (it estimates the curvature)")
        solve = self.curvature.solve if self.precondition != "none" else None
        m = mirror_step(self.fm, self.task, batch, self.config, solve)
        m.predictions = self.task.predictions(out, batch)
        return m

    def calibration(self, reference) -> Calibration:
        """Classification: the temperature and per-class offsets that best fit the model's probabilities
        to `reference` (held-out points with true labels; tasks.fit_calibration). T > 1: the model is
        over-confident on unseen data (and more so on the training points it memorised); T < 1:
        under-confident; an offset > 0: it under-predicts that class."""
        examples = Examples(reference, 1 << 62, "reference set")
        batch = next(self._batches(examples, TEST_INDEX_OFFSET))
        with torch.no_grad():
            return fit_calibration(self._checked_forward(batch, examples.what), batch["targets"])

    def calibrated_log_probabilities(self, calibration: Calibration) -> torch.Tensor:
        """(N, C) the bound training set's class log-probabilities with the model's outputs calibrated
        (Calibration.apply); logs keep 1 - p of a memorised label in float32, where p itself rounds to 1."""
        if self.train is None:
            raise AttributionInputError("call prepare(train) before calibrated_log_probabilities(calibration)")
        call = self.fm.caller(self.fm.theta)
        with torch.no_grad():
            return torch.cat(
                [
                    calibration.apply(self.task.forward(call, b)).log_softmax(1)
                    for b in self._batches(self.train, validate=False)
                ]
            )

    def basis(self, dims: int, rank: int, seed: int) -> Basis:
        """The sketch basis (sketch.py) of the perturbed parameters, split along this engine's curvature; call
        after prepare() (or `use`), so that the curvature is there."""
        return basis(self.curvature if self.precondition != "none" else None, self.fm, dims, rank, seed, self.device)

    def sketch(self, basis: Basis, progress: Progress | None = None) -> torch.Tensor:
        """(N, D) the bound training set's sketches, in its order: x_i . basis.queries(mirror.first)[j] ~
        sign x the linear-mode score of record i for row j (sketch.py)."""
        if self.train is None:
            raise AttributionInputError("call prepare(train) before sketch(basis)")
        fm, batches = self._training(validate=False)
        return project(fm, self.task, batches, basis, progress)

    def losses(self, records) -> torch.Tensor:
        """(n,) the model's loss on each record (the base losses of records outside the bound training set)."""
        examples = Examples(records, self.config.batch_size, "records")
        with torch.no_grad():
            return torch.cat([self.task.loss(self.fm.caller(self.fm.theta), b) for b in self._batches(examples)]).cpu()

    def paired(self, m: Mirror, records, per_row: int, progress: Progress | None = None) -> torch.Tensor:
        """(k, per_row) each row's signed score (as `sweep`'s, score="signed") of its own records, not of a
        shared training set: `records` holds k * per_row records, row j's at j * per_row .. (j+1) * per_row - 1
        (the index's candidates of each test point, worker/leakage.py). Rows are swept max_param_sets at a time."""
        if self.config.score != "signed" or self.tail is not None:
            raise AttributionInputError("paired scores are signed scores of the whole model")
        deltas = m.first if self.config.mode == "linear" else m.total
        k = m.test_loss.shape[0]
        batch = next(self._batches(Examples(records, 1 << 62, "candidates")))
        batch = {key: v.reshape(k, per_row, *v.shape[1:]) for key, v in batch.items()}  # (k, per_row, ...)

        def loss(params, rows):  # (per_row,) losses of one row's records under its parameters
            return self.task.loss(self.fm.caller(params), rows)

        def linear(tangent, rows):
            return jvp(lambda p: loss(p, rows), (self.fm.theta,), (tangent,))[1]

        out, size = [], self.config.max_param_sets
        with torch.no_grad():
            for lo in range(0, k, size):
                rows = {key: v[lo : lo + size] for key, v in batch.items()}
                part = {n: d[lo : lo + size] for n, d in deltas.items()}
                if self.config.mode == "finite":
                    moved = {n: self.fm.theta[n] + d for n, d in part.items()}
                    value = vmap(loss)(moved, rows) - vmap(lambda r: loss(self.fm.theta, r))(rows)
                else:
                    value = vmap(linear)(part, rows)
                out.append(self.config.sign * value)
                if progress:
                    progress(lo // size + 1, -(-k // size))
        return torch.cat(out).cpu()

    def scores(self, test, progress: Progress | None = None) -> torch.Tensor:
        """(n_test, n_train) scores, or (1, n_train) in group mode; positive = the training point
        supports (lowers the loss of) the test point. Raises AttributionInputError on bad input."""
        if self.train is None:
            raise AttributionInputError("call prepare(train) before scores(test)")
        m = self.mirror(test)
        return self.sweep(m, progress)

    def sweep(self, m: Mirror, progress: Progress | None = None) -> torch.Tensor:
        """Scores for an existing mirror, `max_param_sets` rows per pass over the training set (halved
        on out-of-memory). `progress(done, total)` is called after every batch and may raise to cancel."""
        deltas = m.first if self.config.mode == "linear" else m.total
        k = m.test_loss.shape[0]
        per_pass = self.train.num_batches()
        rows, lo, size, done = [], 0, self.config.max_param_sets, 0
        while lo < k:
            hi = min(k, lo + size)
            total = done + per_pass * -(-(k - lo) // size) if per_pass else None

            def report(i, _total, before=done, total=total):
                if progress:
                    progress(before + i, total)

            fm, batches = self._training(validate=False)
            part = {n: d[lo:hi] for n, d in deltas.items()}
            try:
                row, way = sweep(
                    fm,
                    self.task,
                    batches,
                    part,
                    self.config.mode,
                    self.base,
                    self.config.sign,
                    self._ways.get(hi - lo, self.config.stacking),
                    report,
                    self.config.autocast,
                )
                self._ways[hi - lo] = way
                self._way = "single" if hi - lo == 1 and way == "loop" else way
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not _is_oom(exc) or size == 1:
                    raise
                size //= 2  # back off: fewer parameter sets per pass over the training set
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            rows.append(row.cpu())
            done += per_pass or 0
            lo = hi
        scores = torch.cat(rows)
        if self.config.score == "cosine":
            return scores / self.norms.cpu().clamp_min(torch.finfo(scores.dtype).tiny)[None]
        if self.config.score == "relative":
            return scores / self.base.cpu().clamp_min(torch.finfo(scores.dtype).tiny)[None]
        if self.config.score == "abs":
            return scores.abs()
        if self.config.score == "match":  # 0 = responds exactly as the test point itself; lower = less alike
            own = m.self_score.cpu()[:, None]
            return -(scores - own).abs() / own.abs().clamp_min(torch.finfo(scores.dtype).tiny)
        return scores


def attribute(model: torch.nn.Module, task: Task, train, test, config: MirrorConfig | None = None) -> torch.Tensor:
    """One-shot Forward-INF: (n_test, n_train) scores (see ForwardInf.scores)."""
    return ForwardInf(model, task, config).prepare(train).scores(test)
