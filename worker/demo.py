"""Real data and tiny real models for the demo registry, the tests and the benchmarks.

Data ships inside scikit-learn (`load_digits`: 1,797 8x8 images of handwritten digits), so nothing is
downloaded. Training is deterministic (seeded, single-threaded-safe full-batch optimisation).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
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


SPEC = {"shape": [64], "dtype": "float32", "range": [0.0, 1.0], "num_classes": 10, "image_shape": [8, 8]}
MLP = {"in_features": 64, "hidden": [64], "out_features": 10}


def add_model(registry, id: str, model: nn.Module, description: str) -> None:
    """Register a digits classifier (the demo's input spec and MLP shape) from its trained module."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        registry.add_model(id, "classification", "builtin:mlp", weights, SPEC, MLP, description=description)


def add_dataset(registry, id: str, x: torch.Tensor, y: torch.Tensor, parts: int = 1, **kw) -> None:
    """Register digits images x with labels y as `parts` shards."""
    with tempfile.TemporaryDirectory() as tmp:
        bounds = np.linspace(0, len(y), parts + 1).astype(int)
        shards = []
        for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            shards.append(Path(tmp) / f"{id}-{n}.safetensors")
            save_file({"inputs": x[lo:hi].contiguous(), "targets": y[lo:hi].contiguous()}, shards[-1])
        registry.add_dataset(id, shards, SPEC, **kw)


def build_demo_registry(registry) -> None:
    """The demo registry, trained here in seconds on scikit-learn's digits:

    - `digits-mlp` (64 -> 64 -> 10), its training set `digits-train` (1,437 images in 2 shards) and the
      held-out `digits-test` (360 images);
    - for the governance analyses, `digits-audit-mlp` trained on `digits-audit-train`, a training set
      with known problems (see audit_data), and `digits-audit-test` (400 images, the first 40 planted).
    """
    x, y, x_test, y_test = digits()
    add_model(registry, "digits-mlp", digits_mlp(x, y), "MLP 64-64-10 trained on scikit-learn's digits (8x8, [0, 1])")
    add_dataset(registry, "digits-train", x, y, 2, trained=["digits-mlp"], description="digits, training split (1,437)")
    add_dataset(registry, "digits-test", x_test, y_test, description="digits, held-out split (360 images)")

    audit = audit_data()
    add_model(
        registry,
        "digits-audit-mlp",
        digits_mlp(audit["inputs"], audit["targets"]),
        "MLP 64-64-10 trained on digits-audit-train (10% flipped labels, planted test images, copies)",
    )
    add_dataset(
        registry,
        "digits-audit-train",
        audit["inputs"],
        audit["targets"],
        2,
        trained=["digits-audit-mlp"],
        description="digits with known problems: 10% labels flipped, 40 test images planted, 20 records x4",
    )
    add_dataset(
        registry,
        "digits-audit-test",
        audit["test_inputs"],
        audit["test_targets"],
        description="digits held out from the audit model (400 images; the first 40 were planted in training)",
    )


AUDIT_PLANTED, AUDIT_DUPLICATED, AUDIT_COPIES, AUDIT_FLIP = 40, 20, 3, 0.10


def audit_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """A training set with known problems, for the governance analyses and their tests.

    From a 400-image held-out split: `test` (400 images; the first AUDIT_PLANTED were also planted in
    the training set: leakage). The training set: the other 1,397 images with AUDIT_FLIP of their
    labels changed to another class (`flipped`: mislabeled, atypical), then the planted test images,
    then AUDIT_COPIES extra copies of each of AUDIT_DUPLICATED clean records (`duplicated`).
    """
    x, y, x_test, y_test = digits(test_size=400, seed=seed)
    rng = np.random.default_rng(seed + 1)
    n = len(y)
    flipped = torch.tensor(np.sort(rng.choice(n, size=int(AUDIT_FLIP * n), replace=False)))
    labels = y.clone()
    labels[flipped] = (y[flipped] + torch.tensor(rng.integers(1, 10, size=len(flipped)))) % 10
    clean = torch.tensor(np.setdiff1d(np.arange(n), flipped.numpy()))
    duplicated = clean[torch.tensor(rng.choice(len(clean), size=AUDIT_DUPLICATED, replace=False))].sort().values
    planted = slice(0, AUDIT_PLANTED)
    copies = duplicated.repeat(AUDIT_COPIES)
    return {
        "inputs": torch.cat([x, x_test[planted], x[copies]]),
        "targets": torch.cat([labels, y_test[planted], labels[copies]]),
        "true_targets": torch.cat([y, y_test[planted], y[copies]]),  # before the flips
        "test_inputs": x_test,
        "test_targets": y_test,
        "flipped": flipped,
        "duplicated": duplicated,
    }
