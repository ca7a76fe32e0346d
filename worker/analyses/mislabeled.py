"""Mislabeled data: the probability that each training record's label is wrong, from the model's
calibrated probabilities and the record's harm to a clean reference set; the review list it ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contract.jobs import MislabeledJob
from contract.schemas import MislabeledResult

from .evidence import Evidence

HARM_BINS = 10  # mislabeled: harm's likelihood ratio is read per decile (20 or 40 bins measured no better)
NOISE_EVIDENCE = 2.71  # mislabeled: 2 log likelihood ratio that a label-noise rate > 0 explains the labels better
# (the 5% level of a test at the boundary: chi-square(1) / 2 + 0 / 2; bench.mislabeled: 0 or > 500)
CLASS_NOISE_ROUNDS = 500  # mislabeled: EM rounds at most for class-dependent noise (it stops when T settles)
CLASS_RATE_FLOOR = 1e-2  # mislabeled: a class-to-class rate below this (1 label in 100) is not a lean (see below)


def _percentile_rank(v: torch.Tensor) -> torch.Tensor:
    return v.argsort().argsort().double() / max(len(v) - 1, 1)


def label_prior(
    probabilities: torch.Tensor, labels: torch.Tensor, confusion: tuple = ()
) -> tuple[torch.Tensor, float | None, bool]:
    """(P(the recorded label is wrong | the calibrated model's probabilities (N, C)) per record, the uniform
    noise rate it assumed or None, whether it took class-dependent noise). Uniform label noise at rate e
    makes a label y appear with probability (1 - e) p + e r, p = p(y), r = (1 - p) / (C - 1), and wrong
    with posterior e r / ((1 - e) p + e r); e is fitted by maximum likelihood over the training labels
    (concave in e: bisection on its slope). A model that has memorised its training labels explains them
    with e = 0; it has absorbed the label's evidence into p, and the prior is its own 1 - p. Where some
    e > 0 explains the labels better by NOISE_EVIDENCE (the model left labels unexplained: it did not
    memorise them, bench.mislabeled's ResNet) the noise model's posterior is taken; 1 - p there counts
    every uncertain record as half wrong. Else, where class-dependent noise explains them better by as
    much per rate it uses (`class_noise_evidence`: a model that did not memorise flips between some
    classes), the model has learned that lean into every image of those classes, and `unlean` takes it
    out."""
    p = probabilities.gather(1, labels[:, None])[:, 0].clamp(1e-12, 1 - 1e-12)
    r = (1 - p) / max(probabilities.shape[1] - 1, 1)

    def slope(e: float) -> float:
        return float(((r - p) / ((1 - e) * p + e * r)).sum())

    lo, hi = 0.0, 1 - 1 / max(probabilities.shape[1], 2)  # at hi every label is equally likely: they say nothing
    if slope(0.0) > 0:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    e = lo
    gain = 2 * float(torch.log((1 - e) * p + e * r).sum() - torch.log(p).sum())
    if e > 0 and gain > NOISE_EVIDENCE:
        return e * r / ((1 - e) * p + e * r), e, False
    if confusion:
        gain, rates = class_noise_evidence(probabilities, labels)
        if rates and gain > NOISE_EVIDENCE * rates:
            return unlean(probabilities, labels, confusion), None, True
    return 1 - p, None, False


def class_noise_evidence(probabilities: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(2 log likelihood ratio of the training labels under class-dependent label noise against none, the
    number of leaning rates: off-diagonal entries of T above CLASS_RATE_FLOOR). A label y appears with
    probability sum_k p_k T_ky, the transition T fitted by EM (Dawid & Skene 1979; the likelihood is
    concave in T, so EM finds its maximum). Measured on bench.mislabeled's two sets of flips: 0.0 on
    models that memorised their labels; on class flips that were not memorised 8.3 to 78.1 with 1 to 3
    rates above 1%, each a flipped pair (0.035 to 0.18). Models that half memorised random flips showed
    small rates only: a digits MLP 6.9 from 7 rates of at most 0.007, the audit MLP 3.5 from one of
    0.0064; taken as a lean there, `unlean` cut their lists to a fifth and less (docs/benchmarks.md)."""
    c = probabilities.shape[1]
    p = probabilities.clamp_min(1e-12)
    onehot = F.one_hot(labels, c).to(p.dtype)
    t = torch.full((c, c), 0.01 / max(c - 1, 1), dtype=p.dtype).fill_diagonal_(0.99)
    for _ in range(CLASS_NOISE_ROUNDS):
        w = p * t[:, labels].T  # (n, c): p_k T_k,label, then the posterior of each true class
        w = w / w.sum(1, keepdim=True)
        new = (w.T @ onehot) / w.sum(0)[:, None].clamp_min(1e-300)
        done = float((new - t).abs().max()) < 1e-9
        t = new
        if done:
            break
    likely = (p * t[:, labels].T).sum(1)
    rates = int(((t - torch.diag(t.diagonal())) > CLASS_RATE_FLOOR).sum())
    return 2 * float(likely.log().sum() - p.gather(1, labels[:, None]).log().sum()), rates


def unlean(probabilities: torch.Tensor, labels: torch.Tensor, confusion: tuple) -> torch.Tensor:
    """P(wrong) per record for a model that learned a class-dependent lean: the reference set's confusion
    T (row k: what the calibrated model gives clean points of class k; Calibration.confusion) is taken as
    that lean, the clean class posterior q = p T^-1 (clipped to the simplex), and the label y right with
    probability q_y T_yy / (q T)_y. T holds the model's own errors on the reference set as well: taken as
    lean too, they make q sharper than it is, which is harmless where a clean point's class is nearly
    certain (digits) and over-counts wrong labels where classes overlap."""
    t = torch.tensor(confusion, dtype=probabilities.dtype, device=probabilities.device)
    q = (probabilities @ torch.linalg.pinv(t)).clamp_min(0)  # T's rows sum to 1, so q's sum to >= 1
    q = q / q.sum(1, keepdim=True)
    rows = torch.arange(len(labels), device=labels.device)
    right = q[rows, labels] * t[labels, labels] / (q @ t)[rows, labels].clamp_min(1e-300)
    return (1 - right).clamp(0, 1)


def p_wrong(
    probabilities: torch.Tensor, labels: torch.Tensor, harm: torch.Tensor, confusion: tuple = ()
) -> tuple[torch.Tensor, float | None, bool]:
    """(P(the recorded label is wrong | calibrated probabilities, harm) per record, then label_prior's
    noise rate and class-noise flag). The prior is label_prior's; harm updates it by its likelihood
    ratio, its density among wrong and right labels estimated per decile with each record weighted by
    the prior's p and 1 - p (naive Bayes: harm taken as independent of the loss given the label's
    truth). Memorised flips have a low loss, so the prior misses them; the step on the clean reference
    set still finds them harmful. One round: re-weighting by the posterior again (EM) measured worse on
    every bench.mislabeled case."""
    prior, noise, lean = label_prior(probabilities, labels, confusion)
    prior = prior.clamp(1e-12, 1 - 1e-12)
    bins = (_percentile_rank(harm) * HARM_BINS).long().clamp_max(HARM_BINS - 1)
    wrong = torch.zeros(HARM_BINS, dtype=prior.dtype).index_add_(0, bins, prior) / prior.sum()
    right = torch.zeros(HARM_BINS, dtype=prior.dtype).index_add_(0, bins, 1 - prior) / (1 - prior).sum()
    odds = prior / (1 - prior) * (wrong / right.clamp_min(1e-12))[bins]
    return odds / (1 + odds), noise, lean


def mislabeled(e: Evidence, job: MislabeledJob) -> MislabeledResult:
    harm = -e.scores[0].double()  # the group step's score: positive = supports the reference set
    loss = e.base.double()
    p_label = torch.exp(-loss)
    n = len(loss)
    probabilities = e.calibrated.double().exp()
    p, noise, lean = p_wrong(probabilities, e.labels, harm, e.calibrator.confusion)
    p_predicted, predicted = probabilities.max(1)
    rank_by = job.rank_by
    suspicion = {
        "posterior": p,
        "loss": loss,
        "harm": harm,
        "combined": _percentile_rank(loss) + _percentile_rank(harm),
    }[rank_by]
    order = suspicion.argsort(descending=True, stable=True)
    expected_wrong = float(p.sum())
    size = job.review_size or min(n, max(1, round(expected_wrong)))
    review = order[:size]
    labels = e.labels.tolist() if e.labels is not None else [None] * n
    suspects = [
        {
            "rank": r + 1,
            "record_id": e.record_ids[i],
            "index": i,
            "label": labels[i],
            "predicted": int(predicted[i]),
            "p_predicted": float(p_predicted[i]),
            "loss": float(loss[i]),
            "p_label": float(p_label[i]),
            "harm": float(harm[i]),
            "p_wrong": float(p[i]),
        }
        for r, i in enumerate(review.tolist())
    ]
    precision = float(p[review].mean())
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
        f"mislabelled; about {expected_wrong:.0f} wrong labels in all."
        + (
            f" The model did not memorise its labels; they fit it as if {noise:.0%} were wrong at random."
            if noise is not None
            else " The model did not memorise its labels; it leans between classes as the reference set shows, "
            "and that lean is taken out of its probabilities."
            if lean
            else ""
        )
        + (f" Class {worst['label']} has the largest share in review." if worst else "")
    )
    return MislabeledResult(
        summary=summary,
        rank_by=rank_by,
        review_size=size,
        expected_wrong=expected_wrong,
        expected_precision=precision,
        temperature=e.calibrator.temperature,
        class_bias=list(e.calibrator.bias),
        label_noise=noise,
        class_noise=lean,
        precision_method="mean over the review list of p_wrong: the probability that the recorded label is wrong "
        f"given the model's probabilities at temperature {e.calibrator.temperature:.3g} and per-class offsets (both "
        "fitted on the reference set)"
        + (f" and a label-noise rate of {noise:.3f} (fitted on the training labels)" if noise is not None else "")
        + (" with the model's lean between classes on the reference set taken out" if lean else "")
        + ", updated by the record's harm (docs/benchmarks.md, 'The mislabeled review list')",
        review=suspects,
        classes=classes,
    )
