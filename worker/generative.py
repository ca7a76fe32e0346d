"""Real small generative models with ground truth built into their data, trained here on CPU.

- `facts-gpt`: the zoo's tiny GPT trained on a fact corpus (worker/corpus.py) with a byte tokenizer;
  a query's ground-truth proponents are the sentences that state its fact.
- `digits-ddpm`: the zoo's tiny DDPM trained on digits (8x8, scaled to [-1, 1]), then fine-tuned on a
  few exemplar images (a "customized" model, arXiv 2306.09345); the exemplars, appended to the
  training set, are the ground-truth sources of its generations.

    python -m worker.registry demo --generative [--full]

registers both (small versions, for tests, unless --full: the benchmark's, a few minutes).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .corpus import encode, fact_corpus
from .demo import digits
from .forward_inf import CausalLM, Diffusion, build

LENGTH = 40  # bytes per training sentence (the longest is 37)
GPT = {"vocab_size": 256, "block_size": LENGTH, "d_model": 64, "n_layer": 2, "n_head": 4}
UNET = {"in_channels": 1, "width": 32, "time_dim": 32}
DIFFUSION = {"timesteps": 100, "draws": 8}
# method defaults in the manifests, by measurement (python -m bench.generative; docs/benchmarks.md): the
# paper's finite Adam step; for diffusion, the relative loss change (images differ widely in base loss)
LM_METHOD = {"mode": "finite", "optimizer": "adam", "lr": 1e-3, "precondition": "none"}
DDPM_METHOD = {**LM_METHOD, "score": "relative"}
EXEMPLARS = 5
SIZES = {  # small: the tests (seconds); full: bench.generative (minutes)
    False: {"entities": 24, "lm_epochs": 150, "ddpm_steps": 600, "tune_steps": 200},
    True: {"entities": 200, "lm_epochs": 200, "ddpm_steps": 3000, "tune_steps": 300},
}


def train_lm(tokens: torch.Tensor, mask: torch.Tensor, epochs: int, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build("gpt", GPT)
    task, gen = CausalLM(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(tokens) // 64))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(tokens), generator=gen)
        for lo in range(0, len(tokens), 64):
            idx = order[lo : lo + 64]
            loss = task.loss(model, {"inputs": tokens[idx], "targets": mask[idx]}).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_ddpm(model: nn.Module, images: torch.Tensor, steps: int, lr: float, seed: int = 0) -> nn.Module:
    """DDPM noise-prediction training with fresh (timestep, noise) draws each step."""
    gen = torch.Generator().manual_seed(seed)
    alpha_bar = Diffusion(**DIFFUSION).alpha_bar.float()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (min(128, len(images)),), generator=gen)
        x0, t = images[idx], torch.randint(0, DIFFUSION["timesteps"], (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alpha_bar[t].reshape(-1, 1, 1, 1)
        loss = (model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def sample_ddpm(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2): (n, 1, 8, 8) images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    task = Diffusion(**DIFFUSION)
    betas = torch.linspace(1e-4, 0.02, task.timesteps)
    alpha_bar = task.alpha_bar.float()
    x = torch.randn((n, 1, 8, 8), generator=gen)
    for t in reversed(range(task.timesteps)):
        eps = model(x, torch.full((n,), t))
        x = (x - betas[t] / (1 - alpha_bar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        if t:
            x = x + betas[t].sqrt() * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def ddpm_data() -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, exemplars): digits' training split and the first EXEMPLARS held-out images."""
    x, _, x_test, _ = digits()
    return (x * 2 - 1).reshape(-1, 1, 8, 8), (x_test[:EXEMPLARS] * 2 - 1).reshape(-1, 1, 8, 8)


def build_generative_registry(registry, full: bool = False) -> None:
    size = SIZES[full]
    corpus = fact_corpus(size["entities"])
    tokens, mask = (torch.tensor(v) for v in encode(corpus.sentences, length=LENGTH))
    lm = train_lm(tokens, mask, size["lm_epochs"])

    torch.manual_seed(0)
    images, exemplars = ddpm_data()
    base = train_ddpm(build("unet", UNET), images, size["ddpm_steps"], 2e-3)
    custom = train_ddpm(copy.deepcopy(base), exemplars, size["tune_steps"], 5e-4, seed=1)

    text = {"shape": [-1], "dtype": "int64", "vocab_size": 256, "text": "bytes", "max_length": LENGTH}
    image = {"shape": [1, 8, 8], "dtype": "float32", "range": [-1.0, 1.0], "image_shape": [1, 8, 8]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, tmp / "lm.safetensors")
        registry.add_model(
            "facts-gpt", "causal-lm", "builtin:gpt", tmp / "lm.safetensors", text, GPT, method=LM_METHOD,
            description=f"tiny GPT (bytes) trained on a fact corpus of {len(corpus.facts)} invented facts",
        )  # fmt: skip
        save_file({"inputs": tokens, "targets": mask}, tmp / "corpus.safetensors")
        registry.add_dataset(
            "facts-corpus", [tmp / "corpus.safetensors"], text, trained=["facts-gpt"],
            description=f"{len(corpus.sentences)} sentences: paraphrased facts and distractors (worker/corpus.py)",
        )  # fmt: skip
        save_file({k: v.contiguous() for k, v in custom.state_dict().items()}, tmp / "ddpm.safetensors")
        registry.add_model(
            "digits-ddpm", "diffusion", "builtin:unet", tmp / "ddpm.safetensors", image, UNET, task_params=DIFFUSION,
            method=DDPM_METHOD,
            description=f"tiny DDPM on digits (8x8), fine-tuned on {EXEMPLARS} exemplar images",
        )  # fmt: skip
        save_file({"inputs": torch.cat([images, exemplars]).contiguous()}, tmp / "ddpm-train.safetensors")
        registry.add_dataset(
            "digits-ddpm-train", [tmp / "ddpm-train.safetensors"], image, trained=["digits-ddpm"],
            description=f"digits training split (1,437) then the {EXEMPLARS} exemplars the model was fine-tuned on",
        )  # fmt: skip
