"""Built-in architectures, named `builtin:NAME` in model manifests and built from a params dict.

    build("mlp", {"in_features": 64, "hidden": [128], "out_features": 10})

All are small on purpose (the service trains demo models in seconds on CPU) and functional-friendly:
no in-place state, so torch.func.functional_call / vmap / jvp apply.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import AttributionInputError

__all__ = ["MLP", "CNN", "TinyGPT", "TinyUNet", "ZOO", "build"]


class MLP(nn.Module):
    """Flatten -> [Linear -> act] * len(hidden) -> Linear."""

    def __init__(self, in_features: int, out_features: int, hidden: list[int] | int = (128,), activation: str = "relu"):
        super().__init__()
        hidden = [hidden] if isinstance(hidden, int) else list(hidden)
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[activation]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip([in_features, *hidden], hidden, strict=False):
            layers += [nn.Linear(a, b), act()]
        layers.append(nn.Linear(([in_features, *hidden])[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, *in) -> (B, out)
        return self.net(x)


class CNN(nn.Module):
    """Two 3x3 conv layers, average pooling, a linear head; input (B, C, H, W)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.head = nn.Linear(2 * width * (image_size // 2) ** 2, num_classes)

    def forward(self, x):  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(x).flatten(1))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, block_size: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.register_buffer("causal", torch.ones(block_size, block_size, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):  # (B, T, D)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.n_head)  # (B, H, T, T)
        att = att.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style causal transformer (nanoGPT's shape, a few layers): ids (B, T) -> logits (B, T, V)."""

    def __init__(
        self, vocab_size: int = 256, block_size: int = 64, d_model: int = 64, n_layer: int = 2, n_head: int = 4
    ):
        super().__init__()
        if d_model % n_head:
            raise AttributionInputError(f"TinyGPT: d_model={d_model} is not divisible by n_head={n_head}")
        self.block_size = block_size
        self.tok, self.pos = nn.Embedding(vocab_size, d_model), nn.Embedding(block_size, d_model)
        self.blocks = nn.Sequential(*[_Block(d_model, n_head, block_size) for _ in range(n_layer)])
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids):  # (B, T) -> (B, T, V)
        if ids.shape[1] > self.block_size:
            raise AttributionInputError(f"TinyGPT: sequence length {ids.shape[1]} exceeds block_size {self.block_size}")
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.ln(self.blocks(x)))


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:  # (B,) -> (B, dim)
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TinyUNet(nn.Module):
    """A two-level DDPM noise predictor for small images: (x_t (B, C, H, W), t (B,)) -> noise (B, C, H, W)."""

    def __init__(self, in_channels: int = 1, width: int = 32, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inc = nn.Conv2d(in_channels, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.out = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1)
        )
        self.act = nn.SiLU()

    def forward(self, x, t):
        h1 = self.act(self.inc(x) + self.time(_timestep_embedding(t, self.time_dim).to(x.dtype))[:, :, None, None])
        h2 = self.act(self.mid(self.act(self.down(h1))))  # (B, 2W, H/2, W/2)
        return self.out(torch.cat([self.act(self.up(h2)), h1], dim=1))


ZOO = {"mlp": MLP, "cnn": CNN, "gpt": TinyGPT, "unet": TinyUNet}


def build(name: str, params: dict | None = None) -> nn.Module:
    """Construct a built-in architecture; raises AttributionInputError for an unknown name or params."""
    name = name.removeprefix("builtin:")
    if name not in ZOO:
        raise AttributionInputError(f"unknown builtin architecture {name!r}: expected one of {sorted(ZOO)}")
    try:
        return ZOO[name](**(params or {}))
    except TypeError as exc:
        raise AttributionInputError(f"builtin:{name}: bad params {params}: {exc}") from exc
