"""Attribution quality and speed against the field, side by side on the same checkpoints.

    python -m bench.quality            # the full run: 100 LDS models, 100 test points, three setups
    python -m bench.quality --quick    # a few minutes: 24 LDS models, 40 test points, no CNN

Needs the bench extras: `pip install dattri captum matplotlib` (peers are not runtime dependencies).
Ground truth is cached under bench/out/ (not committed) and rebuilt with --regenerate.

Tasks (scikit-learn's bundled data; digits in the demo split):
  LDS         linear datamodeling score (TRAK, arXiv 2303.14186): models retrained on random 50% subsets;
              per test point, Spearman between summed scores of each subset and that model's margin.
              Setups: digits MLP, digits CNN, breast_cancer MLP (all bundled with scikit-learn).
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
from worker.demo import digits, digits_mlp, train_classifier
from worker.forward_inf import Classification, ForwardInf, MirrorConfig, build

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
    "Forward-INF + Hessian of last layer": MirrorConfig(precondition="hessian", params=("LAST",)),
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


def dattri_task(model, shape):
    from dattri.task import AttributionTask

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

    task, probability = dattri_task(model, train[0].shape[1:])
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


def digits_images():
    x, y, x_test, y_test = digits()
    return x.reshape(-1, 1, 8, 8), y, x_test.reshape(-1, 1, 8, 8), y_test


def digits_cnn(x, y, seed=0):
    torch.manual_seed(seed)
    model = build("cnn", {"in_channels": 1, "num_classes": 10, "width": 8, "image_size": 8})
    return train_classifier(model, x, y, epochs=150, seed=seed)


def breast_cancer():
    """scikit-learn's bundled breast-cancer data (569 x 30), standardised by the training split."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = torch.tensor(np.random.default_rng(0).permutation(len(data.target)))
    x = torch.tensor(data.data, dtype=torch.float32)[order]
    y = torch.tensor(data.target, dtype=torch.int64)[order]
    x_train, x_test = x[:400], x[400:]
    mean, std = x_train.mean(0), x_train.std(0)
    return (x_train - mean) / std, y[:400], (x_test - mean) / std, y[400:]


def cancer_mlp(x, y, seed=0):
    torch.manual_seed(seed)
    model = build("mlp", {"in_features": 30, "hidden": [32], "out_features": 2})
    return train_classifier(model, x, y, epochs=200, seed=seed)


# name -> (data, trainer, glob of the last layer); the CNN runs in the full run only
SKIP = {  # (setup, method): why it is not run
    ("digits CNN (2 conv, width 8)", "dattri IF (CG)"): "killed by the OOM killer (24 GiB) at train batch 2048",
    ("digits CNN (2 conv, width 8)", "dattri IF (explicit)"): "not attempted after CG ran out of memory",
}
SETUPS = {
    "digits MLP 64-64-10": (digits, lambda x, y, seed=0: digits_mlp(x, y, seed=seed), "net.3.*"),
    "digits CNN (2 conv, width 8)": (digits_images, digits_cnn, "head.*"),
    "breast_cancer MLP 30-32-2": (breast_cancer, cancer_mlp, "net.3.*"),
}


PEERS = [
    "dattri TracIn (Grad-Dot)",
    "dattri Grad-Cos",
    "dattri TRAK (1 checkpoint)",
    "dattri IF (CG)",
    "dattri IF (explicit)",
]


def run_method(name, model, train, test, ks, last="net.3.*"):
    if name in OURS:
        config = OURS[name]
        if config.params == ("LAST",):
            config = config.replace(params=(last,))
        return ours(config, model, train, test, ks)
    return dattri(name, model, train, test, ks)


# -- ground truth --------------------------------------------------------------------------------------
def margins(model, x, y):
    with torch.no_grad():
        out = model(x)
    correct = out.gather(1, y[:, None])[:, 0]
    other = out.scatter(1, y[:, None], float("-inf")).max(1).values
    return correct - other


def lds_truth(setup: str, train_fn, x, y, x_test, y_test, models: int, regenerate: bool):
    slug = "".join(c if c.isalnum() else "-" for c in setup.lower())
    path = OUT / f"lds-{slug}-{models}-{len(y_test)}.safetensors"
    if path.exists() and not regenerate:
        truth = load_file(path)
        return truth["masks"], truth["margins"]
    gen = torch.Generator().manual_seed(1)
    masks, outs = [], []
    for m in range(models):
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[torch.randperm(len(y), generator=gen)[: len(y) // 2]] = True
        model = train_fn(x[mask], y[mask], seed=100 + m)
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
    ForwardInf(torch.nn.Linear(2, 2), Classification(), MirrorConfig()).prepare(  # torch.func's one-off start-up
        (torch.rand(4, 2), torch.tensor([0, 1, 0, 1]))
    ).scores((torch.rand(1, 2), torch.tensor([1])))
    print(f"# {n_models} LDS models per setup, up to {n_test} test points, torch {torch.__version__}")
    rows = []
    for setup, (load, train_fn, last) in SETUPS.items():
        if args.quick and "CNN" in setup:
            continue
        sx, sy, sx_test, sy_test = load()
        test = (sx_test[:n_test], sy_test[:n_test])
        ks = [1, 10, len(test[1])]
        model = train_fn(sx, sy)
        masks, margins_ = lds_truth(setup, train_fn, sx, sy, *test, n_models, args.regenerate)
        for name in [*OURS, *peers]:
            if (setup, name) in SKIP:
                print(f"  {setup} | {name}: skipped, {SKIP[setup, name]}", flush=True)
                continue
            scores, prep, times = run_method(name, model, (sx, sy), test, ks, last)
            rows.append(
                {
                    "setup": setup,
                    "method": name,
                    "lds": lds(scores, masks, margins_),
                    "setup_s": prep,
                    "k=1": times[1],
                    "k=10": times[10],
                    "k=all": times[ks[-1]],
                    "n_test": ks[-1],
                }
            )
            r = rows[-1]
            print(
                f"  {setup} | {name}: LDS {r['lds']:.3f}, setup {r['setup_s']:.2f} s, "
                f"query {r['k=1']:.3f} / {r['k=10']:.3f} / {r['k=all']:.3f} s",
                flush=True,
            )
    x, y, x_test, y_test = digits()
    model = digits_mlp(x, y)

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
            if config.params == ("LAST",):
                config = config.replace(params=("net.3.*",))
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

    print("\n## LDS and time\n")
    print("| setup | method | LDS | setup s | query s, k=1 | k=10 | k=all (n) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setup']} | {r['method']} | {r['lds']:.3f} | {r['setup_s']:.2f} | {r['k=1']:.3f} | "
            f"{r['k=10']:.3f} | {r['k=all']:.3f} ({r['n_test']}) |"
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
    plot([r for r in rows if r["setup"].startswith("digits MLP")], "quick" if args.quick else "full")


def plot(rows, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        total = r["setup_s"] + r["k=all"]
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
    ax.set_xlabel(f"seconds for {rows[0]['n_test']} test points (setup + query), 2 CPU cores")
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(f"Digits MLP: attribution quality against time ({label} run)")
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "lds-vs-time.png", dpi=120)


if __name__ == "__main__":
    main()
