"""The governance analyses over HTTP with their shipped defaults, on the demo registry's audit set
(worker/demo.py: audit_data: 10% labels flipped, 40 test images planted, 20 records copied 3 times).

    python -m bench.governance

Starts the service (bench.service), lets the worker warm up (the audit model's Hessian), then runs:
  - leakage: the 400 images of digits-audit-test (40 planted, 360 clean): flagged and false-flag rates;
  - mislabeled: ROC AUC of the full ranking for each `rank_by`, and the default review list's precision
    against the precision the service expects;
  - memorization: ROC AUC of reliance, atypical (flipped) and duplicated records against typical ones,
    and how many of each are flagged.
Each with its wall time (POST to finished, warm worker).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import get_args

import numpy as np
from sklearn.metrics import roc_auc_score

from contract.jobs import RankBy
from worker.demo import AUDIT_PLANTED, audit_data
from worker.registry import main as registry_main

from .service import run_to_end, service

AUDIT = {"model": "digits-audit-mlp", "dataset": "digits-audit-train"}
REFERENCE = {"dataset": "digits-audit-test", "indices": list(range(AUDIT_PLANTED, 400))}
TRAIN = 1397


def main() -> None:
    truth = audit_data()
    flipped = np.zeros(len(truth["targets"]), dtype=bool)
    flipped[truth["flipped"].numpy()] = True
    with tempfile.TemporaryDirectory() as tmp:
        registry_main(["--root", tmp, "demo"])
        with service(Path(tmp), warm=True, ATTR_MAX_TEST_POINTS="512") as client:
            test = {"dataset": "digits-audit-test", "indices": list(range(400))}
            seconds, job = run_to_end(client, {**AUDIT, "test": test}, "/v1/analyses/leakage")
            rows = job["result"]["rows"]
            found = np.mean([r["leaked"] for r in rows[:AUDIT_PLANTED]])
            false = np.mean([r["leaked"] for r in rows[AUDIT_PLANTED:]])
            own = np.mean([r["best"]["index"] == TRAIN + r["row"] for r in rows[:AUDIT_PLANTED]])
            print(
                f"leakage: {found:.1%} of 40 planted flagged (best match = its copy: {own:.1%}), "
                f"{false:.2%} of 360 clean flagged; {seconds:.1f} s"
            )
            print(f"  calibration: {job['result']['calibration']}")

            for rank_by in get_args(RankBy):
                body = {**AUDIT, "reference": REFERENCE, "rank_by": rank_by, "review_size": len(flipped)}
                seconds, job = run_to_end(client, body, "/v1/analyses/mislabeled")
                rank = np.empty(len(flipped))
                rank[[s["index"] for s in job["result"]["review"]]] = np.arange(len(flipped))
                print(f"mislabeled rank_by={rank_by}: ROC AUC {roc_auc_score(flipped, -rank):.3f}; {seconds:.1f} s")
            _, job = run_to_end(client, {**AUDIT, "reference": REFERENCE}, "/v1/analyses/mislabeled")
            listed = [s["index"] for s in job["result"]["review"]]
            print(
                f"  default review list: {len(listed)} records, precision {flipped[listed].mean():.3f} "
                f"(expected by the service: {job['result']['expected_precision']:.3f}), recall "
                f"{flipped[listed].sum() / flipped.sum():.3f}; 139 labels flipped"
            )

            rng = np.random.default_rng(0)
            duplicated, atypical = truth["duplicated"].tolist(), truth["flipped"].tolist()[:20]
            typical = sorted(set(range(TRAIN)) - set(duplicated) - set(truth["flipped"].tolist()))
            typical = rng.choice(typical, 24, replace=False).tolist()
            records = {"dataset": "digits-audit-train", "indices": duplicated + atypical + typical}
            seconds, job = run_to_end(client, {**AUDIT, "records": records}, "/v1/analyses/memorization")
            by_index = {r["index"]: r for r in job["result"]["records"]}

            def auc(group):
                scores = [by_index[i]["reliance"] for i in group + typical]
                return roc_auc_score([1] * len(group) + [0] * len(typical), scores)

            def flagged(group, flag):
                return sum(flag in by_index[i]["flags"] for i in group)

            print(
                f"memorization: reliance AUC atypical vs typical {auc(atypical):.3f}, duplicated vs typical "
                f"{auc(duplicated):.3f}; outliers: atypical {flagged(atypical, 'outlier')}/20, typical "
                f"{flagged(typical, 'outlier')}/24, duplicated {flagged(duplicated, 'outlier')}/20; 'duplicated' "
                f"flag: {flagged(duplicated, 'duplicated')}/20 duplicated, {flagged(typical + atypical, 'duplicated')}"
                f"/44 others; {seconds:.1f} s"
            )


if __name__ == "__main__":
    main()
