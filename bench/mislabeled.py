"""The mislabeled analysis' default review list against the truth, on random and class-dependent flips.

    python -m bench.mislabeled [first|second]

Per bench.quality setup (the ResNet too: most of the ~4 minutes) and kind of flip (random: 10% of labels
to another class; class: 25% of classes 1, 3, 4 to 7, 8, 9 on digits, 20% of class 1 to 0 on
breast_cancer), the model is retrained on the flipped labels, the mislabeled preset's group step is
taken on 100 clean held-out points, and the service's own analysis (worker.analyses.mislabeled, default
settings) ranks the training set. Reported: ROC AUC of each ranking (the default first), the
temperature and the range of the class offsets fitted on the reference set, the label-noise rate the
prior assumed ("-": none, the model's own 1 - p(label); "class": class-dependent, the model's lean on the
reference set taken out), and the default review list's size, true precision, the precision the service
reports, and recall; or the service's refusal. `second` runs another set of flips (FLIPS), to check
rules chosen on the first.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from contract.jobs import RankBy
from contract.schemas import MislabeledCreate
from worker.analyses import Evidence
from worker.analyses.mislabeled import mislabeled
from worker.forward_inf import AttributionInputError, Classification, ForwardInf, MirrorConfig

from .quality import SETUPS

DEFAULT = MislabeledCreate.model_fields["rank_by"].default
RANKINGS = (DEFAULT, *(r for r in get_args(RankBy) if r != DEFAULT))


FLIPS = {  # seed, share of random flips, class flips on digits and on breast_cancer: ((from, to) pairs, share)
    "first": (2, 0.10, ([(1, 7), (3, 8), (4, 9)], 0.25), ([(1, 0)], 0.20)),
    "second": (7, 0.15, ([(2, 5), (6, 0), (9, 4)], 0.30), ([(0, 1)], 0.25)),  # to check rules chosen on the first
}


def flipped_labels(y: torch.Tensor, kind: str, flips: str = "first") -> torch.Tensor:
    seed, share, digits, breast_cancer = FLIPS[flips]
    gen, noisy = torch.Generator().manual_seed(seed), y.clone()
    classes = int(y.max()) + 1
    if kind == "random":
        flip = torch.randperm(len(y), generator=gen)[: int(share * len(y))]
        noisy[flip] = (noisy[flip] + torch.randint(1, classes, (len(flip),), generator=gen)) % classes
        return noisy
    pairs, rate = digits if classes == 10 else breast_cancer
    for a, b in pairs:
        members = (y == a).nonzero().flatten()
        noisy[members[torch.randperm(len(members), generator=gen)[: int(rate * len(members))]]] = b
    return noisy


def main(flips: str = "first") -> None:
    print(
        f"| setup | flips | ROC AUC {' / '.join(RANKINGS)} | T | offsets' range | label noise | default list | "
        "true precision | reported | recall |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for setup, (load, train_fn, _) in SETUPS.items():
        x, y, x_test, y_test = load()
        for kind in ("random", "class"):
            noisy = flipped_labels(y, kind, flips)
            wrong = (noisy != y).numpy()
            model = train_fn(x, noisy)
            with torch.no_grad():
                loss = F.cross_entropy(model(x), noisy, reduction="none")
            fi = ForwardInf(model, Classification(), MirrorConfig.preset("mislabeled").replace(group=True))
            reference = (x_test[-100:], y_test[-100:])
            scores = fi.prepare((x, noisy)).scores(reference)
            try:
                calibration = fi.calibration(reference)
            except AttributionInputError as refused:  # what the service answers: the job fails with this
                print(f"| {setup} | {kind} ({wrong.sum()}) | refused: {refused} |", flush=True)
                continue
            calibrated = fi.calibrated_log_probabilities(calibration)
            evidence = Evidence(scores, torch.zeros(1), torch.zeros(1), loss, [str(i) for i in range(len(y))], 1,
                                torch.empty(0, dtype=torch.long), labels=noisy, calibrated=calibrated,
                                calibrator=calibration)  # fmt: skip
            aucs = []
            for rank_by in RANKINGS:
                out = mislabeled(evidence, SimpleNamespace(rank_by=rank_by, review_size=len(y)))
                rank = np.empty(len(y))
                rank[[s.index for s in out.review]] = np.arange(len(y))
                aucs.append(roc_auc_score(wrong, -rank))
            out = mislabeled(evidence, SimpleNamespace(rank_by=DEFAULT, review_size=None))
            listed = [s.index for s in out.review]
            noise = "class" if out.class_noise else "-" if out.label_noise is None else f"{out.label_noise:.3f}"
            print(
                f"| {setup} | {kind} ({wrong.sum()}) | {' / '.join(f'{a:.3f}' for a in aucs)} | "
                f"{calibration.temperature:.2f} | {max(calibration.bias) - min(calibration.bias):.2f} | {noise} | "
                f"{len(listed)} | {wrong[listed].mean():.2f} | {out.expected_precision:.2f} | "
                f"{wrong[listed].sum() / wrong.sum():.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
