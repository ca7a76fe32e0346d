"""Memorization: how much of what the model learnt about a record comes from the record itself rather
than from similar records (reliance), and the outliers it memorised."""

from __future__ import annotations

import math

import torch

from contract.jobs import MemorizationJob
from contract.schemas import MemorizationResult

from .evidence import EVIDENCE, Evidence, distance

COPY_DISTANCE = 1e-3  # memorization: records this close to the audited one are its exact copies


def _reliance(scores: torch.Tensor, records: torch.Tensor, base: torch.Tensor, neighbours: int):
    """Per row (audited record r): its copies (records indistinguishable from r), self influence (r and
    its copies on r's loss), the support of its top other records, and self / (self + support)."""
    rows = torch.arange(len(records))
    own = scores[rows, records]
    same = distance(scores, own, base, base[records]) <= COPY_DISTANCE
    same[rows, records] = True
    self_influence = (scores * same).sum(1)
    top = scores.masked_fill(same, -math.inf).topk(min(neighbours, scores.shape[1] - 1), dim=1)
    support = top.values.clamp_min(0).sum(1)
    reliance = self_influence.clamp_min(0) / (self_influence.clamp_min(0) + support).clamp_min(1e-30)
    return same, self_influence, support, reliance, top


def memorization(e: Evidence, job: MemorizationJob) -> MemorizationResult:
    k = job.neighbours
    scores = e.scores.double()
    same, self_influence, support, reliance, top = _reliance(scores[: e.n], e.records, e.base.double(), k)
    calib = _reliance(scores[e.n :], e.calibration, e.base.double(), k)[3]
    q1, q3 = calib.quantile(0.25), calib.quantile(0.75)
    threshold = min(1.0, float(q3 + 1.5 * (q3 - q1)))  # Tukey's fence: reliance is skewed, most records near 0
    out = []
    for j in reliance.argsort(descending=True).tolist():
        r = int(e.records[j])
        copies = [e.record_ids[i] for i in same[j].nonzero().flatten().tolist() if i != r]
        outlier = bool(reliance[j] > threshold)
        out.append(
            {
                "rank": len(out) + 1,
                "record_id": e.record_ids[r],
                "index": r,
                "self_influence": float(self_influence[j]),
                "neighbour_support": float(support[j]),
                "reliance": float(reliance[j]),
                "copies": copies,
                "neighbours": [
                    {"record_id": e.record_ids[i], "index": i, "score": s}
                    for s, i in zip(top.values[j, :EVIDENCE].tolist(), top.indices[j, :EVIDENCE].tolist(), strict=True)
                ],
                "outlier": outlier,
                "flags": [f for f, on in (("outlier", outlier), ("duplicated", bool(copies))) if on],
            }
        )
    outliers = sum(r["outlier"] for r in out)
    duplicated = sum(bool(r["copies"]) for r in out)
    summary = (
        f"{outliers} of {e.n} records rely on themselves far more than typical records do (reliance above "
        f"{threshold:.2f}); {duplicated} have exact copies in the training set."
    )
    return MemorizationResult(
        summary=summary,
        threshold=threshold,
        threshold_method=f"Tukey's upper fence (Q3 + 1.5 IQR) of the reliance of {len(e.calibration)} training "
        "records spread evenly over the set",
        records=out,
    )
