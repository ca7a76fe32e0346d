"""Leakage: is a test point in the training set, as a copy (the model responds to it as to a training
record) or as a near duplicate (its input is more similar to a record than chance allows)?"""

from __future__ import annotations

import math

import torch

from contract.jobs import LeakageJob
from contract.schemas import IndexUse, LeakageResult

from .evidence import EVIDENCE, Evidence, distance
from .similarity import Similarity, text_profile, text_variants, variants

NULL_QUERIES = 1024  # leakage: training records whose nearest other record calibrates the similarity threshold


def near_setup(e: Evidence) -> tuple[Similarity, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], str]:
    """What near-duplicate detection compares: (the similarity to the training set, the NULL_QUERIES training
    records spread over it that calibrate the threshold (indices), their inputs as compared, changed versions
    of them per kind of change, how similarity is measured)."""
    n = len(e.texts) if e.texts is not None else len(e.inputs)
    spread = torch.linspace(0, n - 1, min(NULL_QUERIES, n)).round().long().unique()
    if e.texts is not None:
        similar = Similarity(text_profile(e.texts), None, standardize=False)
        originals = [e.texts[i] for i in spread.tolist()]
        changes = {kind: text_profile(v) for kind, v in text_variants(originals).items()}
        return similar, spread, text_profile(originals), changes, "hashed character trigrams"
    similar = Similarity(e.inputs, e.image_shape)
    lo, hi = e.input_range or (float(e.inputs.min()), float(e.inputs.max()))
    originals = e.inputs[spread].flatten(1).float()
    how = "the largest Pearson correlation over shifts and a zoom" if e.image_shape else "standardized features"
    return similar, spread, originals, variants(originals, e.image_shape, lo, hi), how


def near_account(similar: Similarity, null: torch.Tensor, originals: torch.Tensor, changes: dict, rate: float,
                 how: str) -> tuple[dict, float]:  # fmt: skip
    """(The near-duplicate rule's calibration, its false-flag rate) from `null`, each spread training record's
    similarity with its most similar other record: the threshold that `rate` of them exceed (records with
    copies left out), and the share of each kind of change that stays above it."""
    null = null[null < 1 - 1e-6]  # the rest have copies in the training set
    ranked = null.sort(descending=True).values
    k = min(int(rate * len(null)), len(null) - 1)  # a new clean query exceeds the (k+1)-th largest
    threshold = float(ranked[k]) if len(null) else 1.0  # of n such values with probability (k+1) / (n+1)
    account = {
        "similarity_threshold": threshold,
        "similarity_method": f"the similarity that {rate:.1%} of {len(null)} training records spread over the set "
        f"exceed with their most similar other record (records with copies left out); {how}",
        "near_duplicate_recall": {
            kind: float((similar.pairs(changed, originals) > threshold).double().mean())
            for kind, changed in changes.items()
        },
    }
    return account, (k + 1) / (len(null) + 1) if len(null) else 0.0


def copy_account(itself: torch.Tensor, nearest_other: torch.Tensor) -> tuple[dict, float]:
    """(The copy rule's calibration, its false-flag rate) from training records used as queries: each one's
    distance to itself (numerical noise) and to its nearest other record."""
    c = len(itself)
    noise = max(float(itself.max()), 1e-9)
    clean = nearest_other > noise  # the rest have true copies in the training set
    chance = float(nearest_other[clean].quantile(0.01)) if clean.any() else math.inf
    threshold = math.sqrt(noise * chance) if chance > noise else noise
    false_flags = float((nearest_other[clean] <= threshold).double().mean()) if clean.any() else 0.0
    calibration = {
        "threshold": threshold,
        "method": f"geometric mean of the largest distance of a training record to itself and the 1st percentile of "
        f"its distance to the nearest other record, both measured with {c} training records as queries "
        f"({c - int(clean.sum())} of which have a copy in the training set and are left out of the latter)",
        "records": c,
        "duplicate_distance": noise,
        "chance_distance": chance,
        "expected_recall": float((itself <= threshold).double().mean()),
    }
    return calibration, false_flags


def leakage(e: Evidence, job: LeakageJob) -> LeakageResult:
    """A test point is in the training set as a *copy* when a record responds to its mirrored step as
    it does itself (model distance, any input), or as a *near duplicate* when a record's input is more
    similar to it than all but `false_flag_rate` of the training records' nearest others are (float inputs)."""
    dist = distance(e.scores.double(), e.own.double(), e.base.double(), e.own_loss.double())
    calib, c = dist[e.n :], len(e.calibration)
    rows = torch.arange(c)
    others = calib.clone()
    others[rows, e.calibration] = math.inf
    calibration, false_flags = copy_account(calib[rows, e.calibration], others.min(1).values)
    sim = None
    if e.inputs is not None or e.texts is not None:
        similar, spread, originals, changes, how = near_setup(e)
        queries = text_profile(e.query_texts) if e.texts is not None else e.query_inputs
        sim, null = similar(queries), similar(originals)
        null[torch.arange(len(spread)), spread] = -math.inf
        account, near_false_flags = near_account(similar, null.amax(1), originals, changes, job.false_flag_rate, how)
        calibration |= account
        false_flags += near_false_flags
    calibration["expected_false_flag_rate"] = false_flags

    k = min(EVIDENCE, dist.shape[1])
    matches = []
    for j in range(e.n):
        candidates = dist[j].topk(k, largest=False).indices.tolist()
        if sim is not None:
            candidates += [i for i in sim[j].topk(k).indices.tolist() if i not in candidates]
        matches.append(
            [
                {
                    "record_id": e.record_ids[i],
                    "index": i,
                    "distance": float(dist[j, i]),
                    "similarity": None if sim is None else float(sim[j, i]),
                }
                for i in candidates
            ]
        )
    return answer(e.tests[: e.n], matches, calibration)


def answer(
    tests: list[dict], matches: list[list[dict]], calibration: dict, index: IndexUse | None = None
) -> LeakageResult:
    """The leakage result from each test point's candidate matches (record_id, index, distance, similarity)
    and the calibration (copy_account, and near_account where inputs are compared): each test point's best
    match, copies first, then by similarity; its verdict; the summary sentence."""
    threshold, near = calibration["threshold"], calibration.get("similarity_threshold")
    out = []
    for j, found in enumerate(matches):
        found = sorted(found, key=lambda m: (m["distance"] > threshold, -(m["similarity"] or 0.0), m["distance"]))
        best = found[0]
        kind = (
            "copy"
            if best["distance"] <= threshold
            else "near-duplicate"
            if near is not None and best["similarity"] is not None and best["similarity"] > near
            else None
        )
        out.append(
            {
                "row": j,
                "test": tests[j],
                "leaked": kind is not None,
                "match": kind,
                "best": best,
                "evidence": found[:EVIDENCE],
            }  # fmt: skip
        )
    leaked = sum(r["leaked"] for r in out)
    copies = sum(r["match"] == "copy" for r in out)
    summary = (
        f"{leaked} of {len(out)} test points are likely present in the training set: {copies} as copies"
        + (f", {leaked - copies} as near duplicates (input similarity above {near:.4f})" if near is not None else "")
        + f"; calibration: {calibration['expected_recall']:.0%} of copies found, "
        f"{calibration['expected_false_flag_rate']:.1%} false flags."
    )
    return LeakageResult(summary=summary, leaked=leaked, rows=out, calibration=calibration, index=index)
