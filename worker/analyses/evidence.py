"""What every analysis reads: the `Evidence` of one job, and `distance`, how alike two records are to the
model.

Two records are *the same* to the model when they respond alike to a mirrored step and have the same
loss: `distance` is the larger of the two relative differences. An exact duplicate is at numerical
noise (~1e-6); the nearest different digit is ~1e-2 away (audit set, calibration in leakage.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..forward_inf import Calibration

EVIDENCE = 5  # matches shown per test point (leakage) or neighbours per record (memorization)


@dataclass
class Evidence:
    """scores: (rows, N) signed scores; own: (rows,) each row's response to its own step (the score an
    exact duplicate gets); own_loss: (rows,) its loss; base: (N,) training losses; rows past `n` are
    calibration queries: the training records `calibration`. `records` are the training indices of
    the first n rows when they are training records (memorization); `tests` what the first n rows are
    (contract.jobs.echo: leakage's rows say it). Leakage, where the model's inputs are float vectors:
    `inputs` the training inputs, `query_inputs` the test points', `image_shape` and `input_range` from
    the model's input spec; where they are text, `texts` and `query_texts` instead. Mislabeled: `calibrated`
    (N, C) the training records' class log-probabilities under the `calibrator` fitted on the reference
    set (ForwardInf.calibration and calibrated_log_probabilities)."""

    scores: torch.Tensor
    own: torch.Tensor
    own_loss: torch.Tensor
    base: torch.Tensor
    record_ids: list[str]
    n: int
    calibration: torch.Tensor
    labels: torch.Tensor | None = None
    records: torch.Tensor | None = None
    tests: list[dict] | None = None
    inputs: torch.Tensor | None = None
    query_inputs: torch.Tensor | None = None
    image_shape: list[int] | None = None
    input_range: tuple[float, float] | None = None
    texts: list[str] | None = None
    query_texts: list[str] | None = None
    calibrated: torch.Tensor | None = None
    calibrator: Calibration | None = None


def distance(scores: torch.Tensor, own: torch.Tensor, base: torch.Tensor, own_loss: torch.Tensor) -> torch.Tensor:
    """(rows, N): max(|s_i - own| / |own|, |L_i - L_own| / (|L_own| + 1e-6)); 0 = the same record. `base`:
    the records' losses, (N,) shared by the rows or (rows, N), each row's own records."""
    tiny = torch.finfo(scores.dtype).tiny
    response = (scores - own[:, None]).abs() / own.abs()[:, None].clamp_min(tiny)
    loss = (base.expand_as(scores) - own_loss[:, None]).abs() / (own_loss.abs()[:, None] + 1e-6)
    return torch.maximum(response, loss)
