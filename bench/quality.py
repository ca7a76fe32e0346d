"""Attribution quality and speed against the field, side by side on the same checkpoints.

    python -m bench.quality            # the full run (~25 min on 2 cores): 100 LDS models, 100 test points
    python -m bench.quality --quick    # under 5 minutes: 24 LDS models, 40 test points

Needs the bench extras: `pip install dattri captum matplotlib` (peers are not runtime dependencies).
Ground truth is cached under bench/out/ (not committed) and rebuilt with --regenerate.

Tasks (scikit-learn's bundled digits, the demo split):
  LDS         linear datamodeling score (TRAK, arXiv 2303.14186): MLPs retrained on random 50% subsets;
              per test point, Spearman between summed scores of each subset and that model's margin.
  LOO         convex L2 logistic regression on 300 points: Pearson with exact leave-one-out effects.
  mislabeled  10% of training labels flipped, model retrained; rank training points by how much they
              hurt a clean reference set (100 held-out points); ROC AUC.
  leakage     40 test images planted in the training set; top-1 / top-5 rate of finding the duplicate.
Times are attribution only (training excluded): setup (per model: base losses, curvature, caches) and
query time for k = 1, 10 and all test points.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from bench.groundtruth import fit_logistic, leave_one_out
from worker.demo import digits, digits_mlp
from worker.forward_inf import Classification, ForwardInf, MirrorConfig

OUT = Path(__file__).resolve().parent / "out"
DOCS = Path(__file__).resolve().parents[1] / "docs"
os.environ.setdefault("TQDM_DISABLE", "1")

OURS = {
    "Forward-INF linear, no curvature (TracIn-like)": MirrorConfig(precondition="none"),
    "Forward-INF finite Adam lr 1e-3 (paper)": MirrorConfig(
        mode="finite", optimizer="adam", lr=1e-3, precondition="none"
    ),
    "Forward-INF finite Adam lr 1e-2": MirrorConfig(mode="finite", optimizer="adam", lr=1e-2, precondition="none"),
    "Forward-INF finite SGD lr 1e-2": MirrorConfig(mode="finite", lr=1e-2, precondition="none"),
    "Forward-INF + diag Fisher": MirrorConfig(precondition="diag", damping=1e-3),
    "Forward-INF + Hessian of last layer": MirrorConfig(precondition="hessian", params=("net.3.*",)),
    "Forward-INF + Hessian = attribution preset": MirrorConfig(),
}


# -- methods: each returns (scores (k, N), setup seconds, {k: query seconds}) --------------------------
def ours(config: MirrorConfig, model, train, test, ks):
    start = time.perf_counter()
    fi = ForwardInf(model, Classification(), config.replace(batch_size=2048)).prepare(train)
    setup = time.perf_counter() - start
    times, scores = {}, None
    for k in ks:
        start = time.perf_counter()
        scores = fi.scores((test[0][:k], test[1][:k]))
        times[k] = time.perf_counter() - start
    return scores, setup, times


def dattri_task(model):
    from dattri.task import AttributionTask

    shape = next(model.parameters()).shape[1:]

    def loss(params, data):  # dattri passes one example with or without a batch dimension
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, x.reshape(-1, *shape)), y.reshape(-1))

    def probability(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, x.reshape(-1, *shape))
        return torch.exp(-F.cross_entropy(out, y.reshape(-1)))

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict()), probability


def dattri(name, model, train, test, ks):
    from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from torch.utils.data import DataLoader, TensorDataset

    task, probability = dattri_task(model)
    make = {
        "dattri TracIn (Grad-Dot)": lambda: TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False),
        "dattri Grad-Cos": lambda: TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=True),
        "dattri TRAK (1 checkpoint)": lambda: TRAKAttributor(
            task, probability, projector_kwargs={"proj_dim": 512, "device": "cpu"}, regularization=1e-2
        ),
        "dattri IF (CG)": lambda: IFAttributorCG(task, regularization=1e-2, max_iter=20),
        "dattri IF (explicit)": lambda: IFAttributorExplicit(task, regularization=1e-2),
    }[name]
    train_dl = DataLoader(TensorDataset(*train), batch_size=2048)
    start = time.perf_counter()
    attributor = make()
    if not name.startswith("dattri TracIn") and name != "dattri Grad-Cos":
        attributor.cache(train_dl)
    setup = time.perf_counter() - start
    times, scores = {}, None
    for k in ks:
        test_dl = DataLoader(TensorDataset(test[0][:k], test[1][:k]), batch_size=max(k, 1))
        start = time.perf_counter()
        out = (
            attributor.attribute(test_dl) if name.startswith("dattri TRAK") else attributor.attribute(train_dl, test_dl)
        )
        times[k] = time.perf_counter() - start
        scores = out.T.detach()  # dattri: (N, k); positive = helpful, as ours
    return scores, setup, times


PEERS = [
    "dattri TracIn (Grad-Dot)",
    "dattri Grad-Cos",
    "dattri TRAK (1 checkpoint)",
    "dattri IF (CG)",
    "dattri IF (explicit)",
]


def run_method(name, model, train, test, ks):
    if name in OURS:
        return ours(OURS[name], model, train, test, ks)
    return dattri(name, model, train, test, ks)


# -- ground truth --------------------------------------------------------------------------------------
def margins(model, x, y):
    with torch.no_grad():
        out = model(x)
    correct = out.gather(1, y[:, None])[:, 0]
    other = out.scatter(1, y[:, None], float("-inf")).max(1).values
    return correct - other


def lds_truth(x, y, x_test, y_test, models: int, regenerate: bool):
    path = OUT / f"lds-digits-mlp-{models}-{len(y_test)}.safetensors"
    if path.exists() and not regenerate:
        truth = load_file(path)
        return truth["masks"], truth["margins"]
    gen = torch.Generator().manual_seed(1)
    masks, outs = [], []
    for m in range(models):
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[torch.randperm(len(y), generator=gen)[: len(y) // 2]] = True
        model = digits_mlp(x[mask], y[mask], seed=100 + m)
        masks.append(mask)
        outs.append(margins(model, x_test, y_test))
    OUT.mkdir(exist_ok=True)
    truth = {"masks": torch.stack(masks), "margins": torch.stack(outs)}
    save_file(truth, path)
    return truth["masks"], truth["margins"]


def lds(scores, masks, margins_) -> float:
    predicted = masks.float() @ scores.T.float()  # (models, k)
    values = [spearmanr(predicted[:, j], margins_[:, j]).statistic for j in range(scores.shape[0])]
    return float(np.nanmean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--regenerate", action="store_true")
    args = parser.parse_args()
    n_models, n_test = (24, 40) if args.quick else (100, 100)
    peers = [p for p in PEERS if not (args.quick and "explicit" in p)]
    torch.manual_seed(0)
    x, y, x_test, y_test = digits()
    ForwardInf(torch.nn.Linear(2, 2), Classification(), MirrorConfig()).prepare(  # torch.func's one-off start-up
        (torch.rand(4, 2), torch.tensor([0, 1, 0, 1]))
    ).scores((torch.rand(1, 2), torch.tensor([1])))
    test = (x_test[:n_test], y_test[:n_test])
    model = digits_mlp(x, y)
    ks = [1, 10, n_test]
    print(f"# digits MLP 64-64-10, N={len(y)}, {n_models} LDS models, {n_test} test points, torch {torch.__version__}")

    masks, margins_ = lds_truth(x, y, *test, n_models, args.regenerate)
    rows = []
    for name in [*OURS, *peers]:
        scores, setup, times = run_method(name, model, (x, y), test, ks)
        rows.append(
            {"method": name, "lds": lds(scores, masks, margins_), "setup_s": setup, **{f"k={k}": times[k] for k in ks}}
        )
        print(f"  {name}: LDS {rows[-1]['lds']:.3f}", flush=True)

    # LOO on the convex model
    xl, yl = x[:300].double(), y[:300]
    logistic = fit_logistic(xl, yl)
    hard = F.cross_entropy(logistic(x_test.double()), y_test, reduction="none").detach().topk(10).indices
    truth = leave_one_out(logistic, xl, yl, x_test[hard], y_test[hard])
    loo = {}
    for name in [
        "Forward-INF linear, no curvature (TracIn-like)",
        "Forward-INF finite Adam lr 1e-3 (paper)",
        "Forward-INF + Hessian = attribution preset",
        "dattri TracIn (Grad-Dot)",
        "dattri IF (CG)",
    ]:
        config = OURS.get(name)
        if config is not None:
            scores = (
                ForwardInf(logistic, Classification(), config.replace(dtype="float64"))
                .prepare((xl, yl))
                .scores((x_test[hard].double(), y_test[hard]))
            )
        else:
            scores = dattri(name, logistic.float(), (xl.float(), yl), (x_test[hard], y_test[hard]), [10])[0].double()
            logistic.double()
        loo[name] = float(
            np.mean([np.corrcoef(s, t)[0, 1] for s, t in zip(scores.numpy(), truth.numpy(), strict=True)])
        )

    # mislabeled: 10% flipped, ranked against a clean reference set
    gen = torch.Generator().manual_seed(2)
    flip = torch.randperm(len(y), generator=gen)[: len(y) // 10]
    noisy = y.clone()
    noisy[flip] = (noisy[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
    is_flipped = np.zeros(len(y), dtype=bool)
    is_flipped[flip.numpy()] = True
    noisy_model = digits_mlp(x, noisy)
    reference = (x_test[-100:], y_test[-100:])
    auc = {}
    for name in [
        "Forward-INF linear, no curvature (TracIn-like)",
        "Forward-INF finite Adam lr 1e-3 (paper)",
        "Forward-INF + diag Fisher",
        "Forward-INF + Hessian of last layer",
        "Forward-INF + Hessian = attribution preset",
        *[p for p in peers if "explicit" not in p],
    ]:
        if name in OURS:
            config = OURS[name].replace(group=True)
            support = ForwardInf(noisy_model, Classification(), config).prepare((x, noisy)).scores(reference)[0]
        else:
            support = dattri(name, noisy_model, (x, noisy), reference, [100])[0].sum(0)
        auc[name] = roc_auc_score(is_flipped, -support.numpy())

    # leakage: 40 planted duplicates
    planted = torch.arange(40)
    x_leak, y_leak = torch.cat([x, x_test[planted]]), torch.cat([y, y_test[planted]])
    leak_model = digits_mlp(x_leak, y_leak)
    duplicate = torch.arange(len(x), len(x_leak))
    leak = {}
    for name, config in [
        ("Forward-INF leakage preset", MirrorConfig.preset("leakage")),
        ("Forward-INF attribution preset", MirrorConfig()),
    ]:
        scores = (
            ForwardInf(leak_model, Classification(), config)
            .prepare((x_leak, y_leak))
            .scores((x_test[planted], y_test[planted]))
        )
        leak[name] = scores
    for name in [p for p in peers if "explicit" not in p]:
        leak[name] = dattri(name, leak_model, (x_leak, y_leak), (x_test[planted], y_test[planted]), [40])[0]
    leak_rates = {}
    for name, scores in leak.items():
        rank = (scores > scores.gather(1, duplicate[:, None])).sum(1)
        leak_rates[name] = ((rank == 0).float().mean().item(), (rank < 5).float().mean().item())

    print("\n## LDS and time (digits MLP)\n")
    print(f"| method | LDS | setup s | query s, k=1 | k=10 | k={n_test} |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['lds']:.3f} | {r['setup_s']:.2f} | {r['k=1']:.3f} | {r['k=10']:.3f} | {r[f'k={n_test}']:.3f} |"
        )
    print("\n## Convex leave-one-out (L2 logistic regression, 300 points, 10 high-loss test points)\n")
    print("| method | mean Pearson with exact LOO |\n|---|---|")
    for name, value in loo.items():
        print(f"| {name} | {value:.3f} |")
    print("\n## Mislabeled detection (10% flipped, clean reference set of 100)\n\n| method | ROC AUC |\n|---|---|")
    for name, value in auc.items():
        print(f"| {name} | {value:.3f} |")
    print("\n## Leakage (40 planted duplicates)\n\n| method | top-1 | top-5 |\n|---|---|---|")
    for name, (top1, top5) in leak_rates.items():
        print(f"| {name} | {top1:.3f} | {top5:.3f} |")
    plot(rows, n_test, "quick" if args.quick else "full")


def plot(rows, n_test, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        total = r["setup_s"] + r[f"k={n_test}"]
        ours_ = r["method"].startswith("Forward-INF")
        ax.scatter(total, r["lds"], marker="o" if ours_ else "s", color="tab:blue" if ours_ else "tab:orange")
        ax.annotate(
            r["method"].replace("Forward-INF", "FI").replace("dattri ", ""),
            (total, r["lds"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds for {n_test} test points (setup + query), 2 CPU cores")
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(f"Digits MLP: attribution quality against time ({label} run)")
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "lds-vs-time.png", dpi=120)


if __name__ == "__main__":
    main()
