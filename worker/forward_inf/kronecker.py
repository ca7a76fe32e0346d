"""Kronecker-factored curvature (K-FAC, EK-FAC) for the mirrored step of models too large for the exact
Hessian: George et al. 2018 (arXiv 1806.03884), Grosse et al. 2023 (arXiv 2308.03296).

For an nn.Linear layer (or transformers' Conv1D, or an nn.Conv2d, its input unfolded into patches) with weight gradient
G_n = sum_t g_t a_t^T for example n (a: the layer's input with a 1 appended for the bias, g: the loss
gradient at its output, t: positions), the curvature of the mean training loss over that layer's
parameters is approximated by the empirical Fisher's Kronecker factors

    A = mean over positions of a a^T,    G = sum over positions of g g^T, averaged over examples,

eigendecomposed once: A = Q_A diag(l_A) Q_A^T, G = Q_G diag(l_G) Q_G^T. In that eigenbasis the curvature
is diagonal with eigenvalues l_G l_A^T (`kfac`) or, corrected (`ekfac`), with the mean squared projected
per-example gradient E[(Q_G^T G_n Q_A)^2]. The preconditioned gradient of a layer is then

    Q_G ( (Q_G^T V Q_A) / (values + damping) ) Q_A^T          V = [grad W | grad b]

the exact inverse of the damped approximation (tests/test_engine.py checks both against explicit
matrices). Layers are independent (block-diagonal). Parameters outside these layers
(embeddings, norms) have no Kronecker form: ForwardInf.plan leaves them unperturbed and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .config import AttributionInputError
from .curvature import Method, register
from .mirror import Functional, Params


@dataclass(frozen=True)
class Layer:
    """A factored layer: its parameters' names in the Functional (bias may be None)."""

    module: str
    weight: str
    bias: str | None
    transposed: bool = False  # weight stored (in, out): transformers' Conv1D (GPT-2)


def _is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's attention and MLP): a linear layer y = x W + b, W of shape (in, out),
    recognised by form so the engine need not import transformers."""
    return (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2
    )


def factored_layers(model: torch.nn.Module, names) -> list[Layer]:
    """The nn.Linear, transformers Conv1D and nn.Conv2d layers (zero padding, no groups) whose weight is
    among `names`."""
    layers = []
    for name, module in model.named_modules():
        conv_ok = isinstance(module, torch.nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
        if not (isinstance(module, torch.nn.Linear) or conv_ok or _is_conv1d(module)):
            continue
        weight, bias = f"{name}.weight", f"{name}.bias"
        if weight in names:
            has_bias = getattr(module, "bias", None) is not None and bias in names
            layers.append(Layer(name, weight, bias if has_bias else None, _is_conv1d(module)))
    return layers


@dataclass
class Kronecker:
    """A fitted K-FAC or EK-FAC curvature: per layer the two eigenbases and the eigenvalues, (out, in[+1])."""

    kind: str  # "kfac" | "ekfac"
    names: list[str]
    layers: list[Layer]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (Q_A, Q_G)
    values: dict[str, torch.Tensor]  # module -> eigenvalues in that basis, undamped
    damping: float | None  # None: not chosen yet (see damped)
    samples: int = 0
    clipped: int = 0  # always 0: every eigenvalue of a Kronecker-factored Fisher is >= 0
    factor: None = field(default=None, repr=False)  # the Hessian's field; a Kronecker curvature has none
    rule: str = ""  # damping "auto": how curvature.auto_damping chose it; "" = as given

    def damped(self, damping: float, rule: str = "") -> Kronecker:
        return replace(self, damping=damping, rule=rule)

    def mean_eigenvalue(self) -> float:
        return float(sum(v.sum() for v in self.values.values()) / sum(v.numel() for v in self.values.values()))

    def solve(self, grads: Params) -> Params:
        """(curvature + damping)^-1 g for each row of (k, *shape) gradients, layer by layer."""
        out = {}
        for layer in self.layers:
            qa, qg = self.bases[layer.module]
            weight = grads[layer.weight].transpose(1, 2) if layer.transposed else grads[layer.weight]
            v = weight.flatten(2)  # (k, out, in): a conv's (out, c, kh, kw) as (out, c*kh*kw)
            if layer.bias is not None:
                v = torch.cat([v, grads[layer.bias][..., None]], dim=2)
            wide = v.to(qa.dtype)
            rotated = qg.T @ wide @ qa / (self.values[layer.module] + self.damping)
            back = (qg @ rotated @ qa.T).to(v.dtype)
            solved = back[..., : weight[0, 0].numel()].reshape(weight.shape)
            out[layer.weight] = solved.transpose(1, 2) if layer.transposed else solved
            if layer.bias is not None:
                out[layer.bias] = back[..., -1]
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a later process needs to rebuild it (restore), as named tensors."""
        out = {}
        for module, (qa, qg) in self.bases.items():
            out[f"{module}/qa"], out[f"{module}/qg"], out[f"{module}/values"] = qa, qg, self.values[module]
        return out

    @classmethod
    def restore(cls, kind, names, model, tensors, damping, samples, rule) -> Kronecker:
        layers = factored_layers(model, names)
        bases = {m.module: (tensors[f"{m.module}/qa"], tensors[f"{m.module}/qg"]) for m in layers}
        values = {m.module: tensors[f"{m.module}/values"] for m in layers}
        return cls(kind, list(names), layers, bases, values, damping, samples, rule=rule)


def _inputs_and_grads(fm: Functional, task, layers: list[Layer], batch) -> dict[str, tuple]:
    """Per layer: (a, g), each (B, positions, features): the layer's input patches with a 1 appended
    for the bias, and the gradient of the summed per-example losses at its output."""
    modules = dict(fm.model.named_modules())
    seen: dict[str, list] = {}
    handles = []

    def capture(name):
        def hook(module, args, out):
            x = args[0]
            if isinstance(module, torch.nn.Conv2d):
                patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                a = patches.transpose(1, 2)  # (B, L, c*kh*kw)
            else:
                a = x.reshape(x.shape[0], -1, x.shape[-1])
            seen[name] = [a.detach(), None, isinstance(module, torch.nn.Conv2d)]
            out.register_hook(lambda grad: seen[name].__setitem__(1, grad.detach()))

        return hook

    for layer in layers:
        handles.append(modules[layer.module].register_forward_hook(capture(layer.module)))
    try:
        theta = {n: t.detach().requires_grad_(True) for n, t in fm.theta.items()}
        loss = task.loss(fm.caller(theta), batch).sum()
        torch.autograd.grad(loss, list(theta.values()))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for layer in layers:
        a, g, conv = seen[layer.module]
        g = g.flatten(2).transpose(1, 2) if conv else g.reshape(g.shape[0], -1, g.shape[-1])  # (B, positions, out)
        if layer.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        out[layer.module] = (a.double(), g.double())
    return out


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric PSD factor. LAPACK's eigh can fail to converge on a
    rank-deficient one (many zero eigenvalues: a wide layer fitted on few positions, e.g. ResNet-18's last
    convolutions); its SVD is then the same decomposition (U S U^T) and always converges."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        u, s, _ = torch.linalg.svd(matrix)
        return s, u


def estimate_kronecker(fm: Functional, task, batches, kind: str, damping: float | None) -> Kronecker:
    """Fit the factors on `batches` (prepared, on the device): one pass for A and G; EK-FAC a second for
    its eigenvalues."""
    names = list(fm.theta)
    layers = factored_layers(fm.model, names)
    if not layers:
        raise AttributionInputError(f"precondition={kind!r}: none of the perturbed parameters is in an nn.Linear "
                                    "or nn.Conv2d layer")  # fmt: skip
    batches = list(batches)
    sums = {m.module: [0, 0, 0] for m in layers}  # sum of a a^T, of g g^T, positions seen
    examples = 0
    for batch in batches:
        for module, (a, g) in _inputs_and_grads(fm, task, layers, batch).items():
            sums[module][0] += torch.einsum("bti,btj->ij", a, a)
            sums[module][1] += torch.einsum("bto,btp->op", g, g)
            sums[module][2] += a.shape[0] * a.shape[1]
        examples += batch["inputs"].shape[0]
    bases, values = {}, {}
    for layer in layers:
        a_sum, g_sum, positions = sums[layer.module]
        a_values, qa = _eigh(a_sum / positions)
        g_values, qg = _eigh(g_sum / examples)
        bases[layer.module] = (qa, qg)
        values[layer.module] = torch.outer(g_values.clamp_min(0), a_values.clamp_min(0))
    if kind == "ekfac":
        values = {module: torch.zeros_like(v) for module, v in values.items()}
        for batch in batches:
            for module, (a, g) in _inputs_and_grads(fm, task, layers, batch).items():
                qa, qg = bases[module]
                projected = torch.einsum("bto,bti->boi", g @ qg, a @ qa)  # Q_G^T G_n Q_A per example
                values[module] += projected.pow(2).sum(0)
        values = {module: v / examples for module, v in values.items()}
    return Kronecker(kind, names, layers, bases, values, damping, examples)


def _estimate(fm: Functional, task, batches, kind: str, damping: float | None, rank_for=None, full=None,
              definite=False) -> Kronecker:  # fmt: skip
    return estimate_kronecker(fm, task, batches, kind, damping)


def _restore(kind, names, model, tensors, damping, samples, clipped, rule, left_out, refused) -> Kronecker:
    return Kronecker.restore(kind, names, model, tensors, damping, samples, rule)


register("kfac", Method(_estimate, _restore, factored=True))
register("ekfac", Method(_estimate, _restore, factored=True))
