"""Real data and tiny real models for the demo registry, the tests and the benchmarks.

Data ships inside scikit-learn (`load_digits`: 1,797 8x8 images of handwritten digits), so nothing is
downloaded. Training is deterministic (seeded, single-threaded-safe full-batch optimisation).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .forward_inf import build


def digits(test_size: int = 360, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (N, 64) float32 in [0, 1], y_train (N,), x_test, y_test), a seeded random split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.tensor(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[order], y[order]
    return x[test_size:], y[test_size:], x[:test_size], y[:test_size]


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Train with Adam on cross-entropy (full batch unless `batch_size`); returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    n = len(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if batch_size else torch.arange(n)
        for lo in range(0, n, batch_size or n):
            idx = order[lo : lo + (batch_size or n)]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def digits_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int = 64, epochs: int = 300, seed: int = 0) -> nn.Module:
    """The demo model: an MLP 64 -> hidden -> 10 trained on the given digits."""
    torch.manual_seed(seed)
    model = build("mlp", {"in_features": 64, "hidden": [hidden], "out_features": 10})
    return train_classifier(model, x, y, epochs=epochs, seed=seed)


def build_demo_registry(registry) -> None:
    """The demo registry: `digits-mlp` (64 -> 64 -> 10, trained here in seconds), its training set
    `digits-train` (1,437 images in 2 shards) and the held-out `digits-test` (360 images)."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    x, y, x_test, y_test = digits()
    model = digits_mlp(x, y)
    spec = {"shape": [64], "dtype": "float32", "range": [0.0, 1.0], "num_classes": 10}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "weights.safetensors")
        registry.add_model(
            "digits-mlp",
            "classification",
            "builtin:mlp",
            tmp / "weights.safetensors",
            spec,
            params={"in_features": 64, "hidden": [64], "out_features": 10},
            description="MLP 64-64-10 trained on scikit-learn's digits (8x8 images scaled to [0, 1])",
        )
        half = len(y) // 2
        shards = []
        for n, (lo, hi) in enumerate([(0, half), (half, len(y))]):
            save_file(
                {"inputs": x[lo:hi].contiguous(), "targets": y[lo:hi].contiguous()}, tmp / f"train-{n}.safetensors"
            )
            shards.append(tmp / f"train-{n}.safetensors")
        registry.add_dataset(
            "digits-train",
            shards,
            spec,
            trained=["digits-mlp"],
            description="training split of scikit-learn's digits (1,437 images)",
        )
        save_file({"inputs": x_test.contiguous(), "targets": y_test.contiguous()}, tmp / "test.safetensors")
        registry.add_dataset(
            "digits-test",
            [tmp / "test.safetensors"],
            spec,
            description="held-out split of scikit-learn's digits (360 images)",
        )
