"""Loss adapters: what a "loss of one example" means for each kind of model.

A batch is a dict of tensors sharing their first dimension: "inputs", optionally "targets", "index"
(each example's position in its dataset) and whatever `Task.prepare` adds. The engine calls

    batch = task.prepare(batch)          # outside autodiff/vmap: validation, fixed random draws
    task.validate(call, batch)           # once per data source: a plain forward, clear errors
    losses = task.loss(call, batch)      # (B,) per-example losses; pure, so vmap/grad/jvp apply

where `call(*args)` runs the model under the parameters being evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .config import AttributionInputError

__all__ = ["Calibration", "Task", "Classification", "Regression", "CausalLM", "Diffusion", "TASKS", "make_task"]

Batch = dict[str, torch.Tensor]
# Test points get their own random-draw seeds, far from any training index.
TEST_INDEX_OFFSET = 1 << 40


class Task:
    """Per-example loss = criterion(forward(call, batch), batch). Subclasses set `name` and override."""

    name = "task"
    needs_targets = True

    def prepare(self, batch: Batch) -> Batch:
        """Add fixed, per-example tensors (outside autodiff/vmap); validate the batch's form."""
        if self.needs_targets and "targets" not in batch:
            raise AttributionInputError(f"{self.name}: targets are required, got inputs only")
        return batch

    def forward(self, call, batch: Batch) -> torch.Tensor:
        return call(batch["inputs"])

    def criterion(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:  # (B,)
        raise NotImplementedError

    def check(self, out: torch.Tensor, batch: Batch) -> None:
        """Raise AttributionInputError if the model's output does not fit the targets."""

    def loss(self, call, batch: Batch) -> torch.Tensor:  # (B,)
        return self.criterion(self.forward(call, batch), batch)

    def predictions(self, out: torch.Tensor, batch: Batch) -> list[dict] | None:
        """Per example, what the model predicts (JSON), where the task has a label to predict."""
        return None


class Classification(Task):
    """Cross-entropy of logits (B, C) against integer labels (B,)."""

    name = "classification"

    def criterion(self, out, batch):
        return F.cross_entropy(out, batch["targets"], reduction="none")

    def predictions(self, out, batch):
        """The true label, the label of the largest logit and its softmax probability."""
        p, predicted = out.detach().float().softmax(1).max(1)
        return [
            {"label": y, "predicted": c, "p_predicted": q}
            for y, c, q in zip(batch["targets"].tolist(), predicted.tolist(), p.tolist(), strict=True)
        ]

    def check(self, out, batch):
        targets = batch["targets"]
        if targets.is_floating_point() or targets.dim() != 1:
            raise AttributionInputError(
                f"classification: targets must be integer class labels of shape (B,), "
                f"got {str(targets.dtype).removeprefix('torch.')} {tuple(targets.shape)}"
            )
        if out.dim() != 2:
            raise AttributionInputError(f"classification: model output must be (B, C), got {tuple(out.shape)}")
        bad = (targets < 0) | (targets >= out.shape[1])
        if bad.any():
            raise AttributionInputError(
                f"classification: label {int(targets[bad][0])} is outside 0..{out.shape[1] - 1}"
            )


LOG_TEMPERATURE_SD = 1.0  # fit_calibration's prior: log T ~ N(0, 1), T within 0.37..2.7 at one sd
CLASS_BIAS_SD = 0.5  # and each class' logit offset ~ N(0, 0.5^2) (bench.mislabeled: 1 and 2 over-state precision)


@dataclass(frozen=True)
class Calibration:
    """A classifier's logits z mapped to calibrated ones z / temperature + bias (bias: one offset per class).
    `confusion`: row k, the calibrated probabilities the model gives, on average, to the reference set's
    points of class k (one pseudo-count on the diagonal: a class the set lacks keeps the identity row); a
    model trained on class-dependent label noise leans there in a way the offsets cannot take back."""

    temperature: float
    bias: tuple[float, ...]
    confusion: tuple[tuple[float, ...], ...] = ()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature + torch.tensor(self.bias, dtype=logits.dtype, device=logits.device)


def fit_calibration(logits: torch.Tensor, targets: torch.Tensor) -> Calibration:
    """Bias-corrected temperature scaling (Alexandari et al. 2020, arXiv 1901.06852): the T and per-class
    offsets b of highest posterior, the summed cross-entropy of logits / T + b against targets plus the
    priors log T ~ N(0, LOG_TEMPERATURE_SD^2) and b ~ N(0, CLASS_BIAS_SD^2), which keep them near (1, 0)
    when there are few targets (two points would otherwise drive T to 0) and are outweighed by a hundred.
    The offsets absorb a model that leans towards some classes, as one trained on class-dependent label
    noise does; T alone cannot. Convex in (1/T, b) but for the prior; L-BFGS from (1, 0) in float64.
    Raises AttributionInputError where, so calibrated, the model explains the targets no better than
    their class frequencies alone (a collapsed training run): its probabilities then say nothing about
    which labels are right."""
    z = logits.detach().double()
    log_scale = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)  # log(1 / T)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device, requires_grad=True)
    lbfgs = torch.optim.LBFGS([log_scale, bias], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective():
        lbfgs.zero_grad()
        value = (
            F.cross_entropy(z * log_scale.exp() + bias, targets, reduction="sum")
            + log_scale**2 / (2 * LOG_TEMPERATURE_SD**2)
            + bias.pow(2).sum() / (2 * CLASS_BIAS_SD**2)
        )
        value.backward()
        return value

    with torch.enable_grad():
        lbfgs.step(objective)
    fitted = Calibration(float(torch.exp(-log_scale.detach())), tuple(bias.detach().tolist()))
    frequencies = targets.bincount().double() / len(targets)
    frequencies = frequencies[frequencies > 0]
    entropy = float(-(frequencies * frequencies.log()).sum())  # the cross-entropy of the frequencies alone
    nll = float(F.cross_entropy(fitted.apply(z), targets))
    if len(frequencies) > 1 and nll >= entropy:
        raise AttributionInputError(
            f"the model explains the reference set's labels no better than their class frequencies alone "
            f"(cross-entropy {nll:.3f} calibrated, {entropy:.3f} from the frequencies): its probabilities "
            "cannot tell a wrong label from a right one (did its training collapse?)"
        )
    counts = torch.eye(z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, targets, fitted.apply(z).softmax(1))
    return replace(fitted, confusion=tuple(map(tuple, (counts / counts.sum(1, keepdim=True)).tolist())))


class Regression(Task):
    """Mean squared error per example (averaged over output dimensions)."""

    name = "regression"

    def criterion(self, out, batch):
        return (out - batch["targets"].to(out.dtype).reshape(out.shape)).pow(2).reshape(out.shape[0], -1).mean(1)

    def check(self, out, batch):
        if out.numel() != batch["targets"].numel():
            raise AttributionInputError(
                f"regression: model output {tuple(out.shape)} does not match targets {tuple(batch['targets'].shape)}"
            )


class CausalLM(Task):
    """Mean next-token NLL per sequence.

    inputs: token ids (B, T). targets (optional): a 0/1 mask (B, T) marking the tokens whose prediction
    counts (a prompt + completion query marks only the completion; padding is 0). Without a mask every
    token after the first counts. The model maps (B, T) ids to (B, T, V) logits.
    """

    name = "causal-lm"
    needs_targets = False

    def prepare(self, batch):
        if batch["inputs"].dim() != 2:
            raise AttributionInputError(
                f"causal-lm: inputs must be token ids (B, T), got {tuple(batch['inputs'].shape)}"
            )
        if "targets" not in batch:
            mask = torch.ones_like(batch["inputs"], dtype=torch.bool)
            mask[:, 0] = False
            batch = {**batch, "targets": mask}
        if not (batch["targets"][:, 1:] != 0).any(1).all():
            raise AttributionInputError("causal-lm: every sequence needs at least one target token after the first")
        return batch

    def check(self, out, batch):
        tokens = batch["inputs"]
        if tokens.is_floating_point() or out.dim() != 3 or out.shape[:2] != tokens.shape:
            raise AttributionInputError(
                f"causal-lm: expected integer tokens (B, T) -> logits (B, T, V), got {tuple(tokens.shape)} "
                f"{str(tokens.dtype).removeprefix('torch.')} -> {tuple(out.shape)}"
            )
        if tokens.min() < 0 or tokens.max() >= out.shape[2]:
            raise AttributionInputError(f"causal-lm: token ids must lie in 0..{out.shape[2] - 1}")

    def criterion(self, out, batch):
        tokens = batch["inputs"]
        logits = out[:, :-1]  # (B, T-1, V): position t predicts token t+1
        nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T-1)
        mask = (batch["targets"][:, 1:] != 0).to(nll.dtype)
        return (nll * mask).sum(1) / mask.sum(1)


class Diffusion(Task):
    """DDPM noise-prediction loss, averaged over `draws` fixed (timestep, noise) pairs per example.

    The draws are seeded by (seed, example index), so the base and every perturbed model see the same
    noise (common random numbers) and scores are deterministic. The model maps (x_t, t) to predicted
    noise. Schedule: linear betas over `timesteps` (Ho et al., arXiv 2006.11239).
    """

    name = "diffusion"
    needs_targets = False

    def __init__(
        self, timesteps: int = 100, draws: int = 8, seed: int = 0, beta_start: float = 1e-4, beta_end: float = 0.02
    ):
        self.timesteps, self.draws, self.seed = timesteps, draws, seed
        self.alpha_bar = torch.cumprod(1 - torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64), 0)

    def prepare(self, batch):
        x = batch["inputs"]
        if not x.is_floating_point():
            raise AttributionInputError(
                f"diffusion: inputs must be float images, got {str(x.dtype).removeprefix('torch.')}"
            )
        ts, noises = [], []
        for i in batch["index"].tolist():
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            ts.append(torch.randint(0, self.timesteps, (self.draws,), generator=gen))
            noises.append(torch.randn((self.draws, *x.shape[1:]), generator=gen, dtype=torch.float64))
        t = torch.stack(ts).to(x.device)  # (B, R)
        noise = torch.stack(noises).to(x.device, x.dtype)  # (B, R, *shape)
        return {**batch, "t": t, "noise": noise}

    def forward(self, call, batch):
        x0, t, noise = batch["inputs"], batch["t"], batch["noise"]
        b, r = t.shape
        ab = self.alpha_bar.to(x0.device, x0.dtype)[t].reshape(b, r, *[1] * (x0.dim() - 1))
        xt = ab.sqrt() * x0.unsqueeze(1) + (1 - ab).sqrt() * noise  # (B, R, *shape)
        return call(xt.flatten(0, 1), t.flatten())  # (B*R, *shape): predicted noise

    def check(self, out, batch):
        if out.numel() != batch["noise"].numel():
            raise AttributionInputError(
                f"diffusion: the model must predict noise of the input's shape {tuple(batch['inputs'].shape[1:])}, "
                f"got {tuple(out.shape)}"
            )

    def criterion(self, out, batch):
        noise = batch["noise"]
        return (out.reshape(noise.shape) - noise).pow(2).reshape(noise.shape[0], -1).mean(1)


TASKS = {cls.name: cls for cls in (Classification, Regression, CausalLM, Diffusion)}


def make_task(name: str, **params) -> Task:
    if name not in TASKS:
        raise AttributionInputError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name](**params)
