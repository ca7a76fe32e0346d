"""Method settings for the mirrored step and the sweep, and the engine's one exception.

`MirrorConfig` is plain data (a frozen dataclass). The service states the fields a request may set, with
the same choices, defaults, presets and rules, in its contract (contract/method.py), which this library
cannot import; tests/test_contract.py fails when the two differ.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal, get_args, get_origin, get_type_hints

__all__ = ["AttributionInputError", "MirrorConfig", "PRESETS"]


class AttributionInputError(ValueError):
    """The model, the data or the settings do not fit together; the message says how."""


Optimizer = Literal["sgd", "adam", "signsgd"]
Direction = Literal["ascent", "descent"]
Mode = Literal["finite", "linear"]
ScoreKind = Literal["signed", "abs", "match", "relative", "cosine"]
Safeguard = Literal["normalize", "none"]


@dataclass(frozen=True)
class MirrorConfig:
    """How to take the mirrored step(s) on the test points and sweep the training set.

    Attributes:
        optimizer: update rule of the mirrored step: "sgd" (step = lr * grad), "adam" (a fresh Adam,
            whose first step is lr * g / (|g| + eps), i.e. about lr * sign(g)), "signsgd".
        lr: step size.
        steps: number of mirrored steps (>= 1). `linear` mode uses the first step's direction only.
        direction: "ascent" (unlearn the test point, the paper's default) or "descent".
        mode: "finite" takes the step(s) and reads each training loss change (arXiv 2402.08922);
            "linear" is the exact first-order value, the directional derivative of each training loss
            along the first step (forward-mode autodiff, no step-size error).
        params: name globs (fnmatch) of the parameters that are perturbed; the rest stay fixed.
        score: "signed" (positive = the training point supports the test prediction), "abs", or "match":
            -|score_i - score_self| / |score_self|, where score_self is the test point's own response to
            its mirrored step. An exact duplicate of the test point responds identically (0, the top);
            this is the leakage detector (raw loss changes favour inputs of large norm instead).
            "relative": the signed score over the training point's own loss (the change of log-loss), so
            training points with large losses (diffusion: images with much detail) do not dominate.
            "cosine" (linear mode): a gradient-cosine-like score from forward passes only: each test
            point's gradient is scaled to unit norm before the step (in group mode: the mean of the unit
            gradients), and each training point's score is divided by the norm of its own loss gradient
            over the model's last linear layer, which one forward pass gives exactly (|r_i| and |h_i|:
            the loss gradient at that layer's output and its input). Points with large gradients
            (high loss) then no longer dominate by magnitude alone.
        group: treat all test points as one query: one step on their mean loss, one score row.
        batch_size: training points per forward batch in the sweep.
        max_param_sets: perturbed parameter sets swept together (each training batch is read once per
            group of this many test points); halved automatically on out-of-memory.
        stacking: how parameter sets meet a training batch: "vmap", "loop", "layers" (linear mode where
            every perturbed parameter is a linear layer's: the layers' terms read from one backward pass,
            layers.py; elsewhere "loop"), or "auto" (time them on a slice of the first batch, keep the
            fastest, per number of sets; the results agree to rounding).
        device: torch device string; None keeps the model where it is.
        dtype: "float32" or "float64"; None keeps the model's dtype.
        adam_betas, adam_eps: Adam's constants.
        memorized_loss: a test point whose loss is below this is treated as memorised (its gradient,
            and so an SGD step, is nearly zero and carries no signal).
        precondition: "none", "diag" (diagonal empirical Fisher), "hessian" (exact, small models or
            parameter subsets), "lowrank" (the same Hessian's top eigenpairs down to a tenth of the
            damping, the rest taken as 0: its cost grows with the eigenvalues above the damping, not with
            the parameters; the exact one where it would need over a quarter of them) or "auto": the
            low-rank Hessian where its largest basis is affordable (at most MAX_HESSIAN_PARAMS perturbed
            parameters and AUTO_HESSIAN_FLOPS for min(parameters, 3 x LOWRANK_MAX_RANK) Hessian-vector
            products over `curvature_samples` points; the exact Hessian is its fallback only within
            AUTO_HESSIAN_PARAMS and that budget; where, with damping "auto", that Hessian turns out to
            have an eigenvalue below -damping (a model away from a minimum), "ekfac" instead); else, when
            all parameters are perturbed and the last layer is a linear or convolution layer, that
            layer's Hessian (the step then moves that layer alone); else "ekfac" where the perturbed
            parameters hold such layers (a transformer whose head is tied to its embedding, a LoRA
            adapter); else "none". The step is taken along H^-1 g, so `linear` scores become
            influence-function scores lr * g_i . H^-1 g_j (curvature.py). "kfac" / "ekfac": Kronecker-factored (eigenvalue-corrected) curvature of the
            nn.Linear, transformers Conv1D and nn.Conv2d layers (kronecker.py), for models of any size; their
            other parameters (embeddings, norms) are then left unperturbed. Estimated once per (model,
            training set).
        damping: added to the curvature's diagonal (plays the role of the training's weight decay);
            "auto": curvature.auto_damping (the model's own weight decay where it sits at an L2 optimum,
            and the floor for parameters it did not decay; else a measured rule per curvature kind).
        curvature_samples: training points (spread evenly over the set) the curvature is estimated from.
        autocast: "bfloat16" or "float16": linear mode's sweep (forward, and the layers way's backward)
            under torch.autocast in that precision; the mirrored step, the curvature and the base losses
            stay at `dtype`. "none": full precision.
        safeguard: for memorised test points under SGD, "normalize" rescales the gradient to unit norm
            before the step, so the row still ranks training points; "none" leaves it (rows near zero).
            Adam and signSGD steps are scale-free already.
    """

    optimizer: Optimizer = "sgd"
    lr: float = 1e-3
    steps: int = 1
    direction: Direction = "ascent"
    mode: Mode = "linear"
    params: tuple[str, ...] = ("*",)
    score: ScoreKind = "signed"
    group: bool = False
    batch_size: int = 512
    max_param_sets: int = 16
    stacking: Literal["auto", "vmap", "loop", "layers"] = "auto"
    device: str | None = None
    dtype: Literal["float32", "float64"] | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    memorized_loss: float = 1e-4
    safeguard: Safeguard = "normalize"
    precondition: Literal["auto", "none", "diag", "hessian", "lowrank", "kfac", "ekfac"] = "auto"
    damping: float | Literal["auto"] = "auto"
    curvature_samples: int = 4096
    autocast: Literal["none", "bfloat16", "float16"] = "none"

    def __post_init__(self) -> None:
        for name, choices in _choices(type(self)).items():
            if getattr(self, name) not in choices:
                raise AttributionInputError(f"{name}={getattr(self, name)!r}: expected one of {choices}")
        if self.damping != "auto" and not (isinstance(self.damping, int | float) and self.damping >= 0):
            raise AttributionInputError(f"damping={self.damping!r}: must be 'auto' or a number >= 0")
        if not self.lr > 0:
            raise AttributionInputError(f"lr={self.lr}: must be > 0")
        for name in ("steps", "batch_size", "max_param_sets", "curvature_samples"):
            if int(getattr(self, name)) < 1:
                raise AttributionInputError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.autocast != "none" and self.mode != "linear":
            raise AttributionInputError("autocast needs mode='linear' (loss differences vanish in reduced precision)")
        if self.score == "cosine" and self.mode != "linear":
            raise AttributionInputError("score='cosine' needs mode='linear' (a unit-norm first-order step)")
        if self.precondition != "none" and self.damping != "auto" and self.damping <= 0:
            raise AttributionInputError(
                "precondition needs damping > 0 (a classifier's curvature is singular without it)"
            )
        if isinstance(self.params, str):
            object.__setattr__(self, "params", (self.params,))
        object.__setattr__(self, "params", tuple(self.params))  # a list from JSON means the same
        if not self.params:
            raise AttributionInputError("params: at least one name glob is needed")

    @property
    def sign(self) -> float:
        """+1 for ascent, -1 for descent: theta' = theta + sign * update, score = sign * dL."""
        return 1.0 if self.direction == "ascent" else -1.0

    def replace(self, **changes) -> MirrorConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> MirrorConfig:
        """A named, measured setting (see docs/benchmarks.md): "attribution", "leakage", "mislabeled",
        "testing" (float64, for exactness checks)."""
        if name not in PRESETS:
            raise AttributionInputError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@functools.cache
def _choices(cls: type) -> dict[str, tuple]:
    """Field -> the values it takes, for every field typed `Literal[...]` (or `Literal[...] | None`)."""
    out = {}
    for name, hint in get_type_hints(cls).items():
        if get_origin(hint) is Literal:
            out[name] = get_args(hint)
        elif type(None) in get_args(hint) and any(get_origin(a) is Literal for a in get_args(hint)):
            out[name] = (*(v for a in get_args(hint) if get_origin(a) is Literal for v in get_args(a)), None)
    return out


# Chosen by measurement (python -m bench.quality; figures in docs/benchmarks.md):
# - attribution: the exact first-order score along a curvature-preconditioned step: on the digits MLP
#   its LDS is 0.395 (the same as dattri's CG and explicit influence functions) against 0.16-0.21 for
#   every unpreconditioned setting; convex LOO Pearson 0.98 against 0.53. The Hessian is taken
#   where its low-rank basis fits AUTO_HESSIAN_FLOPS ("auto", see MirrorConfig.precondition); above that
#   budget the last layer's: on the digits CNN LDS 0.362 after a 2 s setup, where the full Hessian took 357 s
#   for 0.347 and the plain step (TracIn-like) gives 0.08. Damping 1e-2 (the convex model's L2). Low
#   rank ("lowrank": 18 of the MLP's 4,810 eigenvalues exceed that damping): the same LDS from 256
#   Hessian-vector products instead of 4,810.
# - leakage: a finite Adam ascent step with the "match" score. A memorised duplicate has a tiny gradient,
#   so gradient dot products miss it (digits MLP, 20 planted: top-1 0/20); a sign-like Adam step moves
#   every weight, but the raw loss change favours images with more ink (top-1 0-1/20 for lr 0.005-1.0).
#   The duplicate's loss change equals the test point's own: "match" finds 20/20 at lr 0.01, 0.05, 0.2.
# - mislabeled: group mode over a clean reference set (one step on the mean of its unit gradients);
#   training points whose loss the step raises are the ones the clean data disagrees with. The cosine
#   score keeps high-loss points from winning by gradient size alone, the diagonal Fisher is a cheap
#   curvature. 10% flipped, ROC AUC: digits MLP 0.825, digits CNN 0.848, breast_cancer 0.978, against
#   0.678 / 0.566 / 0.840 for the plain step and 0.755 / 0.862 / 0.733 for the attribution preset (best
#   peer per setup: Grad-Cos 0.779, dattri TRAK 0.806, Grad-Cos 0.987).
AUTO_HESSIAN_PARAMS = 5_000  # a 5k x 5k float64 Hessian is 200 MB
# Cost of the exact Hessian ~ parameters x samples x forward FLOPs of one example (torch's FLOP counter).
# Measured on 2 CPU cores: digits MLP 6.5e10 -> 12 s (5-7 s since its products are vmapped in a measured
# chunk, curvature.products); digits CNN 8.9e11 -> 357 s (convolution HVPs are slower per FLOP, and
# slower still on a busy machine). 1e11 keeps a full-Hessian setup under ~40 s there.
AUTO_HESSIAN_FLOPS = 1e11
TAIL_INPUTS_BYTES = 1 << 30  # the training set's inputs to a perturbed last module kept at most (mirror.Tail)

PRESETS: dict[str, dict] = {
    "attribution": {},
    "leakage": {"mode": "finite", "optimizer": "adam", "lr": 0.05, "score": "match", "precondition": "none"},
    "mislabeled": {"mode": "linear", "group": True, "score": "cosine", "precondition": "diag", "damping": 1e-3},
    "testing": {"dtype": "float64", "safeguard": "none", "precondition": "none"},
}
