"""Linear mode at k = 16 test points: the sweep's cost per test point over plain inference, per precondition.

    python -m bench.linear [--n 100000] [--preconditions none,auto]

The issue-35 MLP (64-256-10, 19,210 parameters) on random records, one torch thread (set here). Each
precondition's engine is prepared once (its one-off setup is not timed), then one sweep of k = 16 test points
is timed against no_grad inference of the same model over the same records, measured just before it. It prints
what each precondition perturbs: at this size "auto" steps the last layer alone (the whole model's Hessian is
over its budget), and its sweep runs that layer on inputs computed once, which is why it costs less than
`none`, which steps all parameters (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from worker.forward_inf import Classification, ForwardInf, MirrorConfig, build

K = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--preconditions", default="none,auto")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build("mlp", {"in_features": 64, "hidden": [256], "out_features": 10}).eval()
    x, y = torch.randn(args.n, 64), torch.randint(0, 10, (args.n,))
    test = (torch.randn(K, 64), torch.randint(0, 10, (K,)))
    print(f"torch {torch.__version__}, 1 thread, N={args.n}, k={K}")
    print("| precondition | perturbed | sweep s | inference s | per test point / inference |\n|---|---|---|---|---|")
    for precondition in args.preconditions.split(","):
        config = MirrorConfig(mode="linear", lr=1e-3, batch_size=256, precondition=precondition)
        fi = ForwardInf(model, Classification(), config).prepare((x, y))
        mirror = fi.mirror(test)
        with torch.no_grad():
            start = time.perf_counter()
            for i in range(0, args.n, 256):
                model(x[i : i + 256])
            infer = time.perf_counter() - start
        start = time.perf_counter()
        fi.sweep(mirror)
        sweep = time.perf_counter() - start
        perturbed = sum(t[0].numel() for t in mirror.first.values())
        print(f"| {precondition} | {perturbed:,} parameters | {sweep:.2f} | {infer:.3f} | {sweep / K / infer:.2f} |")


if __name__ == "__main__":
    main()
