"""Data-governance answers read off the engine's output: leakage, mislabeled data, memorization.

Each function takes the `Evidence` of one job (score matrix, the mirror's own responses, base losses) and
the job's typed payload (its options), and returns the JSON of its result schema (contract/schemas.py).
The statistics, and the measurements behind their defaults, are in docs/benchmarks.md ("Governance
analyses").

Two records are *the same* to the model when they respond alike to a mirrored step and have the same
loss: `distance` is the larger of the two relative differences. An exact duplicate is at numerical
noise (~1e-6); the nearest different digit is ~1e-2 away (audit set, calibration below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from contract.jobs import LeakageJob, MemorizationJob, MislabeledJob
from contract.schemas import LeakageResult, MemorizationResult, MislabeledResult

COPY_DISTANCE = 1e-3  # memorization: records this close to the audited one are its exact copies
EVIDENCE = 5


@dataclass
class Evidence:
    """scores: (rows, N) signed scores; own: (rows,) each row's response to its own step (the score an
    exact duplicate gets); own_loss: (rows,) its loss; base: (N,) training losses; rows past `n` are
    calibration queries: the training records `calibration`. `records` are the training indices of
    the first n rows when they are training records (memorization); `tests` what the first n rows are
    (contract.jobs.echo: leakage's rows say it)."""

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


def distance(scores: torch.Tensor, own: torch.Tensor, base: torch.Tensor, own_loss: torch.Tensor) -> torch.Tensor:
    """(rows, N): max(|s_i - own| / |own|, |L_i - L_own| / (|L_own| + 1e-6)); 0 = the same record."""
    tiny = torch.finfo(scores.dtype).tiny
    response = (scores - own[:, None]).abs() / own.abs()[:, None].clamp_min(tiny)
    loss = (base[None] - own_loss[:, None]).abs() / (own_loss.abs()[:, None] + 1e-6)
    return torch.maximum(response, loss)


def leakage(e: Evidence, job: LeakageJob) -> dict:
    dist = distance(e.scores.double(), e.own.double(), e.base.double(), e.own_loss.double())
    calib, c = dist[e.n :], len(e.calibration)
    rows = torch.arange(c)
    itself = calib[rows, e.calibration]  # a record against itself: what an exact duplicate scores
    others = calib.clone()
    others[rows, e.calibration] = math.inf
    noise = max(float(itself.max()), 1e-9)
    nearest_other = others.min(1).values
    nearest_other = nearest_other[nearest_other > noise]  # the rest have true copies in the training set
    chance = float(nearest_other.quantile(0.01)) if len(nearest_other) else math.inf
    threshold = math.sqrt(noise * chance) if chance > noise else noise
    calibration = {
        "threshold": threshold,
        "method": f"geometric mean of the largest distance of a training record to itself and the 1st percentile of "
        f"its distance to the nearest other record, both measured with {c} training records as queries "
        f"({c - len(nearest_other)} of which have an exact copy in the training set and are left out of the latter)",
        "records": c,
        "duplicate_distance": noise,
        "chance_distance": chance,
        "expected_recall": float((itself <= threshold).double().mean()),
        "expected_false_flag_rate": float((nearest_other <= threshold).double().mean()) if len(nearest_other) else 0.0,
    }
    near = dist[: e.n].topk(min(EVIDENCE, dist.shape[1]), dim=1, largest=False)
    out = []
    for j in range(e.n):
        matches = [
            {"record_id": e.record_ids[i], "index": i, "distance": d}
            for d, i in zip(near.values[j].tolist(), near.indices[j].tolist(), strict=True)
        ]
        flagged = matches[0]["distance"] <= threshold
        out.append({"row": j, "test": e.tests[j], "leaked": flagged, "best": matches[0], "evidence": matches})
    leaked = sum(r["leaked"] for r in out)
    summary = (
        f"{leaked} of {e.n} test points are likely present in the training set (best match within {threshold:.2g}; "
        f"calibration: {calibration['expected_recall']:.0%} of duplicates found, "
        f"{calibration['expected_false_flag_rate']:.1%} false flags)."
    )
    return LeakageResult(summary=summary, leaked=leaked, rows=out, calibration=calibration).model_dump(mode="json")


def mislabeled(e: Evidence, job: MislabeledJob) -> dict:
    harm = -e.scores[0].double()  # the group step's score: positive = supports the reference set
    loss = e.base.double()
    p_label = torch.exp(-loss)
    n = len(loss)

    def percentile_rank(v):
        return v.argsort().argsort().double() / max(n - 1, 1)

    rank_by = job.rank_by
    suspicion = {"loss": loss, "harm": harm, "combined": percentile_rank(loss) + percentile_rank(harm)}[rank_by]
    order = suspicion.argsort(descending=True)
    expected_wrong = float((1 - p_label).sum())
    size = job.review_size or min(n, max(1, round(expected_wrong)))
    review = order[:size]
    labels = e.labels.tolist() if e.labels is not None else [None] * n
    suspects = [
        {
            "rank": r + 1,
            "record_id": e.record_ids[i],
            "index": i,
            "label": labels[i],
            "loss": float(loss[i]),
            "p_label": float(p_label[i]),
            "harm": float(harm[i]),
        }
        for r, i in enumerate(review.tolist())
    ]
    precision = float((1 - p_label[review]).mean())
    in_review = torch.zeros(n, dtype=torch.bool)
    in_review[review] = True
    classes = []
    if e.labels is not None:
        for label in sorted(set(labels)):
            mask = e.labels == label
            classes.append(
                {
                    "label": label,
                    "records": int(mask.sum()),
                    "in_review": int((mask & in_review).sum()),
                    "mean_loss": float(loss[mask].mean()),
                    "mean_harm": float(harm[mask].mean()),
                }
            )
    worst = max(classes, key=lambda c: c["in_review"] / c["records"], default=None)
    summary = (
        f"Review {size} of {n} records (ranked by {rank_by}); about {precision:.0%} of them are expected to be "
        f"mislabelled. The model's own estimate is {expected_wrong:.0f} wrong labels in all."
        + (f" Class {worst['label']} has the largest share in review." if worst else "")
    )
    return MislabeledResult(
        summary=summary,
        rank_by=rank_by,
        review_size=size,
        expected_wrong=expected_wrong,
        expected_precision=precision,
        precision_method="mean over the review list of 1 - p_label, the model's probability that the recorded "
        "label is wrong; it counts labels the model has memorised as right, so it tends to understate",
        review=suspects,
        classes=classes,
    ).model_dump(mode="json")


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


def memorization(e: Evidence, job: MemorizationJob) -> dict:
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
    ).model_dump(mode="json")


ANALYSES = {"leakage": leakage, "mislabeled": mislabeled, "memorization": memorization}
