"""Linear mode: the sweep's cost per test point over plain inference, per precondition and per way.

    python -m bench.linear [--n 100000] [--ks 1,16] [--preconditions none,auto,diag,kfac,ekfac]
        [--ways vmap,layers] [--batch 1024] [--autocast none,bfloat16]

The issue-35 MLP (64-256-10, 19,210 parameters) on random records, one torch thread (set here). Each
precondition's engine is prepared once per way (its one-off setup is not timed), then one sweep of k test
points is timed against no_grad inference (forward + loss) of the same model over the same records,
measured just before it (the median of three such pairs). The ways (worker/forward_inf/sweep.py): "vmap"
(k = 1: "loop") runs each tangent through the model by forward-mode autodiff (the jvp); "layers" reads
the linear layers' terms from one backward pass (worker/forward_inf/layers.py). It prints what each
precondition perturbs: "auto" steps the last layer alone at this size (the whole model's Hessian is over
its budget) and sweeps that layer on its inputs (and, for "layers", its output gradients) kept from
prepare; the others step every parameter (docs/scaling.md). With `--autocast` naming reduced precisions
too, each runs after "none" with the same test points, and its row says how far its scores are from full
precision's: the relative error (Frobenius) and the mean overlap of each row's top 10.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from contract.settings import Settings
from worker.forward_inf import Classification, ForwardInf, MirrorConfig, build

BATCH = Settings.model_fields["batch_size"].default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--ks", default="1,16")
    parser.add_argument("--preconditions", default="none,auto,diag,kfac,ekfac")
    parser.add_argument("--ways", default="vmap,layers")
    parser.add_argument("--batch", type=int, default=BATCH, help="records per batch (default: the service's)")
    parser.add_argument("--autocast", default="none", help="precisions, e.g. none,bfloat16 (none first)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("mlp", {"in_features": 64, "hidden": [256], "out_features": 10}).eval()
    x, y = torch.randn(args.n, 64), torch.randint(0, 10, (args.n,))
    print(f"torch {torch.__version__}, 1 thread, N={args.n}, batch {args.batch}")
    print(
        "| k | precondition | perturbed | way | autocast | sweep s | inference s | per test point / inference "
        "| vs full: relative error, top-10 overlap |\n|---|---|---|---|---|---|---|---|---|"
    )
    full: dict[tuple, torch.Tensor] = {}
    settings = itertools.product(args.preconditions.split(","), args.ways.split(","), args.autocast.split(","))
    for precondition, way, autocast in settings:
        config = MirrorConfig(
            lr=1e-3, batch_size=args.batch, precondition=precondition, stacking=way, autocast=autocast
        )
        fi = ForwardInf(model, Classification(), config).prepare((x, y))
        for k in map(int, args.ks.split(",")):
            gen = torch.Generator().manual_seed(k)
            mirror = fi.mirror((torch.randn(k, 64, generator=gen), torch.randint(0, 10, (k,), generator=gen)))
            scores = fi.sweep(mirror)  # and a warm-up
            pairs = []
            for _ in range(3):
                with torch.no_grad():
                    start = time.perf_counter()
                    for i in range(0, args.n, args.batch):
                        fi.task.criterion(model(x[i : i + args.batch]), {"targets": y[i : i + args.batch]})
                    infer = time.perf_counter() - start
                start = time.perf_counter()
                fi.sweep(mirror)
                pairs.append((time.perf_counter() - start, infer))
            sweep, infer = sorted(pairs, key=lambda p: p[0] / p[1])[1]
            perturbed = sum(t[0].numel() for t in mirror.first.values())
            print(
                f"| {k} | {fi.precondition} | {perturbed:,} parameters | {fi.execution()['stacking']} | {autocast} "
                f"| {sweep:.2f} | {infer:.3f} | {sweep / k / infer:.2f} "
                f"| {_versus(full, (precondition, way, k), scores)} |",
                flush=True,
            )


def _versus(full: dict, key: tuple, scores: torch.Tensor) -> str:
    """How far `scores` are from the first ones seen under `key` (full precision's): kept when first."""
    reference = full.setdefault(key, scores)
    if reference is scores:
        return ""
    error = ((scores - reference).norm() / reference.norm()).item()
    top = [
        len(set(a.topk(10).indices.tolist()) & set(b.topk(10).indices.tolist())) / 10
        for a, b in zip(reference, scores, strict=True)
    ]
    return f"{error:.1e}, {sum(top) / len(top):.2f}"


if __name__ == "__main__":
    main()
