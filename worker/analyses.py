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
import random
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from contract.jobs import LeakageJob, MemorizationJob, MislabeledJob
from contract.schemas import IndexUse, LeakageResult, MemorizationResult, MislabeledResult

from .forward_inf import Calibration

COPY_DISTANCE = 1e-3  # memorization: records this close to the audited one are its exact copies
EVIDENCE = 5
NULL_QUERIES = 1024  # leakage: training records whose nearest other record calibrates the similarity threshold


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


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(n, C, H, W) images moved by (dy, dx) pixels, the edge filled with zeros."""
    h, w, s = img.shape[-2], img.shape[-1], max(abs(dy), abs(dx))
    return F.pad(img, (s, s, s, s))[..., s - dy : s - dy + h, s - dx : s - dx + w]


def _zoom(img: torch.Tensor, m: int) -> torch.Tensor:
    """m > 0: the centre without an m-pixel border, enlarged back to size; m < 0: shrunk inside one."""
    h, w = img.shape[-2:]
    if m > 0:
        return F.interpolate(img[..., m : h - m, m : w - m], size=(h, w), mode="bilinear", align_corners=False)
    inner = F.interpolate(img, size=(h + 2 * m, w + 2 * m), mode="bilinear", align_corners=False, antialias=True)
    return F.pad(inner, (-m, -m, -m, -m))


def aligned(x: torch.Tensor, image_shape: list[int] | None) -> torch.Tensor:
    """(A, n, d): the inputs x (n, d) and, for images, their small re-alignments: shifts of up to
    max(1, H // 16) pixels each way, and a zoom in and out by max(1, H // 8) pixels per side."""
    if not image_shape:
        return x[None]
    img = x.reshape(len(x), -1, *image_shape[-2:])
    s, m = max(1, img.shape[-2] // 16), max(1, img.shape[-2] // 8)
    views = [_shift(img, dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)] + [
        _zoom(img, m),
        _zoom(img, -m),
    ]
    return torch.stack([v.reshape(len(x), -1) for v in views])


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm: their dot products are Pearson correlations."""
    v = v - v.mean(-1, keepdim=True)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Similarity:
    """Input-space similarity to a training set's records: the largest Pearson correlation of the two
    inputs when either is re-aligned (images, as they are: `aligned`) or of the features standardized by
    the training set's spread (other vectors, whose features have their own units; `standardize=False`
    keeps them: text profiles). 1 = the same up to brightness and contrast; symmetric, so a changed copy
    is found whichever side was changed."""

    def __init__(self, train: torch.Tensor, image_shape: list[int] | None, standardize: bool = True):
        self.image_shape, train = image_shape, train.flatten(1).float()
        standardize = standardize and not image_shape
        self.mean, self.std = (train.mean(0), train.std(0).clamp_min(1e-12)) if standardize else (0.0, 1.0)
        self.train = self.scaled(train)

    @classmethod
    def of_spread(cls, mean: torch.Tensor, std: torch.Tensor, image_shape: list[int] | None) -> Similarity:
        """For pairs only (`pairs`, `scaled`): features standardized by a spread measured before (an index's
        sample of the training set: worker/leakage.py) instead of the whole set's."""
        out = cls.__new__(cls)
        out.image_shape, out.mean, out.std, out.train = image_shape, mean, std, None
        return out

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).float() - self.mean) / self.std

    def _both(self, x: torch.Tensor, x_aligned: torch.Tensor, y: torch.Tensor, pair) -> torch.Tensor:
        """The larger of pair(aligned x, y) and pair(x, aligned y), over the alignments (x, x_aligned: unit)."""
        one = pair(x_aligned, _unit(y)).amax(0)
        return torch.maximum(one, pair(x, _unit(aligned(y, self.image_shape))).amax(0))

    def __call__(self, x: torch.Tensor, block: int = 4096) -> torch.Tensor:
        """(rows, N) each query's similarity with every training record."""
        x = self.scaled(x)
        x_unit, x_aligned = _unit(x), _unit(aligned(x, self.image_shape))  # once, for every block
        blocks = self.train.split(block)
        return torch.cat([self._both(x_unit, x_aligned, t, lambda a, b: a @ b.mT) for t in blocks], dim=1)

    def pairs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(n,) the similarity of x[i] with y[i]."""
        x = self.scaled(x)
        return self._both(_unit(x), _unit(aligned(x, self.image_shape)), self.scaled(y), lambda a, b: (a * b).sum(-1))


def variants(x: torch.Tensor, image_shape: list[int] | None, lo: float, hi: float) -> dict[str, torch.Tensor]:
    """Changed versions of records x (n, d) that a leak typically is: pixel noise (5% of the input range),
    brightness (x 0.7), contrast (x 0.7 about the mean) and, for images, a 1-pixel shift and a crop."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    mean = x.mean(1, keepdim=True)
    out = {
        "noise": (x + 0.05 * (hi - lo) * noise).clamp(lo, hi),
        "brightness": lo + (x - lo) * 0.7,
        "contrast": mean + (x - mean) * 0.7,
    }
    if image_shape:
        img = x.reshape(len(x), -1, *image_shape[-2:])
        out["shift"] = _shift(img, 1, 0).reshape(x.shape)
        out["crop"] = _zoom(img, max(1, img.shape[-2] // 8)).reshape(x.shape)
    return out


def text_profile(texts: list[str], buckets: int = 4096) -> torch.Tensor:
    """(n, buckets) counts of each text's character trigrams, hashed, after case folding and with runs
    of whitespace as one space: texts that differ only in case or spacing have the same profile."""
    out = torch.zeros(len(texts), buckets)
    for i, text in enumerate(texts):
        text = " ".join(text.casefold().split())
        for j in range(max(1, len(text) - 2)):
            out[i, zlib.crc32(text[j : j + 3].encode()) % buckets] += 1
    return out


def text_variants(texts: list[str]) -> dict[str, list[str]]:
    """Changed versions of texts that a leak typically is: upper case, other spacing, one word replaced
    by another word of the texts (seeded)."""
    rng = random.Random(0)
    words = sorted({w for t in texts for w in t.split()}) or [""]

    def one_word(text: str) -> str:
        w = text.split() or [""]
        w[rng.randrange(len(w))] = rng.choice(words)
        return " ".join(w)

    return {
        "case": [t.upper() for t in texts],
        "whitespace": ["  ".join(t.split()) + " \n" for t in texts],
        "word": [one_word(t) for t in texts],
    }


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


ANALYSES = {"leakage": leakage, "mislabeled": mislabeled, "memorization": memorization}
