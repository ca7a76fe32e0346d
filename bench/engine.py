"""Engine speed, as ratios measured side by side in one run (this machine is shared and noisy).

    python -m bench.engine [--n 50000] [--repeats 3]

For each model (the digits MLP, a wider MLP, the zoo CNN; inputs of the digits' shape, synthetic
values, N training points):
  sweep/infer   time to score k=1 test point / plain no_grad inference over the same training set
  batching      per-test-point time at k=16 / per-test-point time at k=1
  vs naive      the paper's loop (deepcopy, fresh optimizer, base losses recomputed) / ours, k=16
  linear/finite cost of mode="linear" / mode="finite", k=16
Each figure is the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from worker.forward_inf import Classification, ForwardInf, MirrorConfig, build

MODELS = {
    "digits-mlp": ("mlp", {"in_features": 64, "hidden": [64], "out_features": 10}, (64,)),
    "wide-mlp": ("mlp", {"in_features": 64, "hidden": [512, 512], "out_features": 10}, (64,)),
    "cnn": ("cnn", {"in_channels": 1, "num_classes": 10, "width": 16, "image_size": 8}, (1, 8, 8)),
}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def naive(model, x, y, xt, yt, lr, batch):
    """The reference notebooks' loop: per test point, deepcopy the model, a fresh Adam, one ascent step,
    then base and perturbed losses over the whole training set."""
    rows = []
    for j in range(len(xt)):
        with torch.no_grad():
            base = torch.cat(
                [
                    F.cross_entropy(model(x[i : i + batch]), y[i : i + batch], reduction="none")
                    for i in range(0, len(x), batch)
                ]
            )
        clone = copy.deepcopy(model)
        opt = torch.optim.Adam(clone.parameters(), lr=lr)
        opt.zero_grad()
        (-F.cross_entropy(clone(xt[j : j + 1]), yt[j : j + 1])).backward()  # ascent
        opt.step()
        with torch.no_grad():
            new = torch.cat(
                [
                    F.cross_entropy(clone(x[i : i + batch]), y[i : i + batch], reduction="none")
                    for i in range(0, len(x), batch)
                ]
            )
        rows.append(new - base)
    return torch.stack(rows)


def run(n: int, repeats: int, batch: int) -> list[dict]:
    return [measure(name, arch, params, shape, n, repeats, batch) for name, (arch, params, shape) in MODELS.items()]


def measure(name, arch, params, shape, n, repeats, batch) -> dict:
    torch.manual_seed(0)
    model = build(arch, params).eval()
    x, y = torch.rand(n, *shape), torch.randint(0, 10, (n,))
    xt, yt = x[:16] + 0.01, y[:16]
    config = MirrorConfig(mode="finite", optimizer="adam", lr=1e-3, batch_size=batch, precondition="none")
    fi = ForwardInf(model, Classification(), config).prepare((x, y))

    def infer():
        with torch.no_grad():
            for i in range(0, n, batch):
                model(x[i : i + batch])

    t_infer = timed(infer, repeats)
    t_k1 = timed(lambda: fi.scores((xt[:1], yt[:1])), repeats)
    t_k16 = timed(lambda: fi.scores((xt, yt)), repeats)
    fi.config = config.replace(mode="linear")
    t_lin16 = timed(lambda: fi.scores((xt, yt)), repeats)
    fi.config = config
    t_naive = timed(lambda: naive(model, x, y, xt, yt, 1e-3, batch), max(1, repeats // 2))
    ours, ref = fi.scores((xt, yt)), naive(model, x, y, xt, yt, 1e-3, batch)
    agree = torch.corrcoef(torch.stack([ours.flatten(), ref.flatten()]))[0, 1].item()
    return {
        "model": name,
        "n": n,
        "infer_s": t_infer,
        "k1_s": t_k1,
        "k16_s": t_k16,
        "sweep/infer": t_k1 / t_infer,
        "batching": (t_k16 / 16) / t_k1,
        "vs naive": t_naive / t_k16,
        "linear/finite": t_lin16 / t_k16,
        "naive agreement r": agree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, N={args.n}, batch {args.batch}")
    cols = [
        "model",
        "infer_s",
        "k1_s",
        "k16_s",
        "sweep/infer",
        "batching",
        "vs naive",
        "linear/finite",
        "naive agreement r",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in run(args.n, args.repeats, args.batch):
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
