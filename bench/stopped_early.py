"""Models stopped early, whose Hessian is indefinite past the damping (docs/benchmarks.md, "A model
stopped early").

    python -m bench.stopped_early [--only NAMES] [--models NAMES]

Five of bench.quality's networks trained for a few epochs only. Per model: its own 100-model LDS truth
(cached in bench/out), then per method, side by side in one run, LDS and setup + query s for 100 test
points: the attribution preset, "old auto" (precondition="lowrank" with its exact-Hessian fallback: what
auto ran before ENGINE_VERSION 2026.12.13), dattri's CG and Kronfluence's EK-FAC (where installed; run in
the Kronfluence environment). The preset's execution says which curvature it took.
"""

from __future__ import annotations

import argparse

import torch

from worker.demo import digits, digits_mlp
from worker.forward_inf import Classification, ForwardInf, MirrorConfig

from . import quality
from .quality import breast_cancer, cancer_mlp, lds_rows, lds_truth

OLD_AUTO = "Forward-INF old auto (low-rank Hessian, negatives clipped)"
WIDE = "digits MLP 64-128-10 20 epochs"
MODELS = {
    "breast_cancer MLP 10 epochs": (breast_cancer, lambda x, y, seed=0: cancer_mlp(x, y, seed, epochs=10)),
    "breast_cancer MLP 30 epochs": (breast_cancer, lambda x, y, seed=0: cancer_mlp(x, y, seed, epochs=30)),
    "digits MLP 10 epochs": (digits, lambda x, y, seed=0: digits_mlp(x, y, epochs=10, seed=seed)),
    "digits MLP 20 epochs": (digits, lambda x, y, seed=0: digits_mlp(x, y, epochs=20, seed=seed)),
    WIDE: (digits, lambda x, y, seed=0: digits_mlp(x, y, hidden=128, epochs=20, seed=seed)),
}
METHODS = f"={quality.PRESET},={OLD_AUTO},dattri IF (CG),Kronfluence"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=METHODS, help="the methods, as bench.quality's --only")
    parser.add_argument("--models", default="", help="just the models whose names contain one of these (a,b)")
    args = parser.parse_args()
    quality.OURS[OLD_AUTO] = MirrorConfig(precondition="lowrank")
    quality.SKIP[WIDE, "dattri IF (CG)"] = "it peaks at 10 GB on the 4,810-parameter MLP already"
    quality.ONLY.extend(part for part in args.only.split(",") if part)
    rows = []
    for name, (load, train_fn) in MODELS.items():
        if args.models and not any(part in name for part in args.models.split(",")):
            continue
        x, y, x_test, y_test = load()
        masks, margins = lds_truth(f"stopped early {name}", train_fn, x, y, x_test, y_test, 100, False)
        model = train_fn(x, y)
        with torch.no_grad():
            accuracy = float((model(x).argmax(1) == y).double().mean())
        ran = ForwardInf(train_fn(x, y), Classification(), MirrorConfig()).prepare((x, y)).execution()
        print(f"# {name}: train accuracy {accuracy:.3f}; the preset took {ran['precondition']}", flush=True)
        rows += lds_rows(name, model, (x, y, x_test, y_test), "net.3.*", [1, 10, len(y_test)], masks, margins, True)
    print("\n| model | method | LDS | setup + query s (100 test points) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['method']} | {r['lds']:.3f} | {r['setup_s'] + r['k=all']:.2f} |")


if __name__ == "__main__":
    main()
