"""Attribution quality and speed against the field, side by side on the same checkpoints.

    python -m bench.quality            # the full run: 100 LDS models, 100 test points, four setups
    python -m bench.quality --quick    # a few minutes: 24 LDS models, 40 test points, no CNN or ResNet

Needs the bench extra (`EXTRAS=worker,test,bench ./scripts/install`: dattri, captum, traker, matplotlib;
peers are not runtime dependencies); Kronfluence is an optional peer, run when installed (kronfluence()).
`--only a,b` runs just the methods whose names contain a or b (`=name`: that name alone), `--setups a,b`
just those setups, and `--part lds|tasks` just the LDS or just the mislabeled and leakage tasks (and LOO);
`--repeat N` times each method N times in a row and reports the medians (breast_cancer's are ~0.1 s).
Ground truth is cached under bench/out/ (not committed) and rebuilt with --regenerate.

Tasks (scikit-learn's bundled data; digits in the demo split):
  LDS         linear datamodeling score (TRAK, arXiv 2303.14186): models retrained on random 50% subsets;
              per test point, Spearman between summed scores of each subset and that model's margin.
              Setups: digits MLP, digits CNN, breast_cancer MLP (all bundled with scikit-learn), and a
              121k-parameter ResNet on digits at 32x32 (50 LDS models): its ground truth takes 31-45 min
              on 2 CPU cores, the preset 31-40 s, EK-FAC of all layers ~11 min (docs/benchmarks.md).
  LOO         convex L2 logistic regression on 300 points: Pearson with exact leave-one-out effects.
  mislabeled  per setup: 10% of training labels flipped, model retrained; rank training points by how
              much they hurt a clean reference set (100 held-out points); ROC AUC.
  leakage     per setup: 40 test points planted in the training set; top-1 / top-5 rate of finding
              the duplicate.
Times are attribution only (training excluded): setup (per model: base losses, curvature, caches, and
for ours the one-off stacking calibration) and query time for k = 1, 10 and all test points; peak
memory is the growth of resident memory while the method runs.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import logging
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import roc_auc_score

from bench.groundtruth import fit_logistic, leave_one_out
from worker.analyses.mislabeled import p_wrong
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
    "Forward-INF finite Adam lr 1e-3, 3 steps": MirrorConfig(
        mode="finite", optimizer="adam", lr=1e-3, steps=3, precondition="none"
    ),
    "Forward-INF finite Adam lr 1e-2": MirrorConfig(mode="finite", optimizer="adam", lr=1e-2, precondition="none"),
    "Forward-INF finite SGD lr 1e-2": MirrorConfig(mode="finite", lr=1e-2, precondition="none"),
    "Forward-INF finite SGD lr 1e-1": MirrorConfig(mode="finite", lr=1e-1, precondition="none"),
    "Forward-INF + diag Fisher": MirrorConfig(precondition="diag", damping=1e-3),
    "Forward-INF + Hessian of last layer": MirrorConfig(precondition="hessian", params=("LAST",)),
    "Forward-INF + K-FAC": MirrorConfig(precondition="kfac"),
    "Forward-INF + K-FAC, damping 1e-5": MirrorConfig(precondition="kfac", damping=1e-5),
    "Forward-INF + EK-FAC": MirrorConfig(precondition="ekfac"),
    "Forward-INF + EK-FAC, damping 1e-2": MirrorConfig(precondition="ekfac", damping=1e-2),
    "Forward-INF + K-FAC, damping 1e-2": MirrorConfig(precondition="kfac", damping=1e-2),
    "Forward-INF + EK-FAC, damping 1e-5": MirrorConfig(precondition="ekfac", damping=1e-5),
    "Forward-INF + EK-FAC, damping 1e-6": MirrorConfig(precondition="ekfac", damping=1e-6),
    "Forward-INF + EK-FAC of last layer, damping 1e-5": MirrorConfig(
        precondition="ekfac", damping=1e-5, params=("LAST",)
    ),
    "Forward-INF + EK-FAC of last layer": MirrorConfig(precondition="ekfac", params=("LAST",)),
    "Forward-INF attribution preset (auto curvature)": MirrorConfig(),
    "Forward-INF cosine (unit steps, last-layer norms)": MirrorConfig(score="cosine", precondition="none"),
    "Forward-INF cosine + diag Fisher": MirrorConfig(score="cosine", precondition="diag", damping=1e-3),
}
PRESET = "Forward-INF attribution preset (auto curvature)"
PEERS = [
    "Kronfluence EK-FAC",
    "dattri TracIn (Grad-Dot)",
    "dattri Grad-Cos",
    "dattri TRAK (1 checkpoint)",
    "traker TRAK (1 checkpoint)",
    "Captum TracInCPFast (last layer)",
    "dattri IF (CG)",
    "dattri IF (explicit)",
]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextmanager
def peak_memory(into: dict):
    """Peak growth of this process's resident memory (MB) over the block: the kernel's high-water mark
    (VmHWM), reset to the current size as the block starts (/proc/self/clear_refs, Linux >= 4.0); freed
    heap is trimmed first so the growth is the block's own. No sampling thread: one that woke every 2 ms
    slowed the methods it watched (2026-12-03, breast_cancer, medians of 5: ours 0.105-0.122 s -> 0.146-0.191 s,
    dattri's CG 0.390-0.434 s -> 0.484-0.510 s)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_kb("VmRSS")
    try:
        yield
    finally:
        into["peak_mb"] = max(0, _status_kb("VmHWM") - start) / 1024


# -- methods: each returns (scores (k, N), setup seconds, {k: query seconds}) --------------------------
def timed(query, test, ks):
    """query(x, y) -> (k, N) scores for the first k test points, for each k in turn: the last scores
    and {k: seconds}."""
    times, scores = {}, None
    for k in ks:
        start = time.perf_counter()
        scores = query(test[0][:k], test[1][:k])
        times[k] = time.perf_counter() - start
    return scores, times


def ours(config: MirrorConfig, model, train, test, ks):
    start = time.perf_counter()
    fi = ForwardInf(model, Classification(), config.replace(batch_size=2048)).prepare(train)
    fi.scores((test[0][:2], test[1][:2]))  # one-off per engine: stacking="auto" times vmap against a loop
    setup = time.perf_counter() - start
    scores, times = timed(lambda x, y: fi.scores((x, y)), test, ks)
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

    def query(x, y):
        test_dl = DataLoader(TensorDataset(x, y), batch_size=len(y))
        trak = name.startswith("dattri TRAK")
        out = attributor.attribute(test_dl) if trak else attributor.attribute(train_dl, test_dl)
        return out.T.detach()  # dattri: (N, k); positive = helpful, as ours

    scores, times = timed(query, test, ks)
    return scores, setup, times


def captum_fast(model, train, test, ks, last):
    """Captum's TracInCPFast: TracIn on the last linear layer's gradients, from its input and the
    loss gradient at its output (one checkpoint, the trained model; learning rate 1)."""
    from captum.influence import TracInCPFast
    from torch.utils.data import TensorDataset

    layer = model.get_submodule(last.removesuffix(".*"))
    start = time.perf_counter()
    tracin = TracInCPFast(
        model,
        layer,
        TensorDataset(*train),
        ["trained"],  # the model as it is: the load function below leaves it and returns the lr
        checkpoints_load_func=lambda model, path: 1.0,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
        batch_size=2048,
    )
    setup = time.perf_counter() - start
    scores, times = timed(lambda x, y: tracin.influence((x, y)).detach(), test, ks)
    return scores, setup, times


def kronfluence(model, train, test, ks):
    """Kronfluence's EK-FAC influence functions with its defaults (factors from the sampled-label Fisher,
    damping 0.1 x the mean eigenvalue), measurement = the query's loss. Optional peer, not in the bench
    extra: its torchvision requirement has no CPU build for torch 2.13.0 in our index, and its wheel
    ships a top-level `tests` package that shadows this project's. So in a venv of its own:
    `VENV=.venv-kron EXTRAS=worker,bench scripts/install`, then in it `pip install kronfluence` and
    `pip uninstall torchvision` (kronfluence imports without it)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class Loss(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1)[:, 0]
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    task, dataset = Loss(), TensorDataset(*train)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        model = prepare_model(copy.deepcopy(model), task)
        analyzer = Analyzer("bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out)
        analyzer.fit_all_factors(
            "ekfac", dataset, per_device_batch_size=512, factor_args=FactorArguments(strategy="ekfac")
        )
        setup = time.perf_counter() - start

        def query(x, y):
            name = f"k{len(y)}"
            analyzer.compute_pairwise_scores(
                name, "ekfac", TensorDataset(x, y), dataset, per_device_query_batch_size=len(y),
                per_device_train_batch_size=512,
            )  # fmt: skip
            return analyzer.load_pairwise_scores(name)["all_modules"].float()  # (k, N); positive = helpful

        scores, times = timed(query, test, ks)
    return scores, setup, times


def traker(model, train, test, ks):
    """The `traker` package (MadryLab): one checkpoint, its CPU projector (normal, 512 dims), float32,
    regularised as dattri's TRAK."""
    from trak import TRAKer

    logging.getLogger("TRAK").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as save_dir:
        start = time.perf_counter()
        tr = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=len(train[1]),
            save_dir=save_dir,
            device="cpu",
            proj_dim=512,
            use_half_precision=False,
            lambda_reg=1e-2,  # as dattri's TRAK here: X^T X + 1e-2 I (singular when N < proj_dim)
        )
        tr.load_checkpoint(model.state_dict(), model_id=0)
        for lo in range(0, len(train[1]), 2048):
            batch = (train[0][lo : lo + 2048], train[1][lo : lo + 2048])
            tr.featurize(batch=batch, num_samples=len(batch[1]))
        tr.finalize_features()
        setup = time.perf_counter() - start

        def query(x, y):
            name = f"k{len(y)}"
            tr.start_scoring_checkpoint(exp_name=name, checkpoint=model.state_dict(), model_id=0, num_targets=len(y))
            tr.score(batch=(x, y), num_samples=len(y))
            return torch.as_tensor(np.asarray(tr.finalize_scores(exp_name=name))).T.float()

        scores, times = timed(query, test, ks)
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


def cancer_mlp(x, y, seed=0, epochs=200):
    torch.manual_seed(seed)
    model = build("mlp", {"in_features": 30, "hidden": [32], "out_features": 2})
    return train_classifier(model, x, y, epochs=epochs, seed=seed)


class ResNet(torch.nn.Module):
    """A small ResNet-style CNN: a stem, three residual blocks (width w, 2w, 4w; the last two stride 2),
    global average pooling, a linear head. w=20: 121k parameters."""

    class Block(torch.nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1)
            self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1)
            self.skip = torch.nn.Conv2d(cin, cout, 1, stride) if cin != cout or stride != 1 else torch.nn.Identity()

        def forward(self, x):
            return F.relu(self.conv2(F.relu(self.conv1(x))) + self.skip(x))

    def __init__(self, w: int = 20, classes: int = 10):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, w, 3, 1, 1)
        self.blocks = torch.nn.Sequential(self.Block(w, w, 1), self.Block(w, 2 * w, 2), self.Block(2 * w, 4 * w, 2))
        self.head = torch.nn.Linear(4 * w, classes)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def digits_32():
    """Digits up-sampled to 32 x 32 (bilinear), as images."""

    def up(v):
        return F.interpolate(v.reshape(-1, 1, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)

    x, y, x_test, y_test = digits()
    return up(x), y, up(x_test), y_test


def digits_resnet(x, y, seed=0):
    torch.manual_seed(seed)  # lr 3e-3: at 1e-2 this unnormalised network collapsed to one class on some seeds
    return train_classifier(ResNet(), x, y, epochs=30, lr=3e-3, batch_size=128, seed=seed)


# name -> (data, trainer, glob of the last layer); the CNN and the ResNet run in the full run only
RESNET = "digits ResNet (3 residual blocks, 32x32, 121k)"
SKIP = {  # (setup, method): why it is not run
    ("digits CNN (2 conv, width 8)", "dattri IF (CG)"): "out of memory (24 GiB) at train batch 2048; at 128, "
    "k=1 took 37 s and k=10 203 s, k=100 would take ~39 min (its CG reruns per training batch)",
    ("digits CNN (2 conv, width 8)", "dattri IF (explicit)"): "not attempted: CG was already out of reach",
    (RESNET, "dattri IF (CG)"): "not attempted: out of reach on the smaller CNN already",
    (RESNET, "dattri IF (explicit)"): "not attempted: out of reach on the smaller CNN already",
}
SETUPS = {
    "digits MLP 64-64-10": (digits, lambda x, y, seed=0: digits_mlp(x, y, seed=seed), "net.3.*"),
    "digits MLP 64-128-10": (digits, lambda x, y, seed=0: digits_mlp(x, y, hidden=128, seed=seed), "net.3.*"),
    "digits CNN (2 conv, width 8)": (digits_images, digits_cnn, "head.*"),
    "breast_cancer MLP 30-32-2": (breast_cancer, cancer_mlp, "net.3.*"),
    RESNET: (digits_32, digits_resnet, "head.*"),
}
MODELS = {RESNET: 50}  # LDS models where fewer than the 100: each ResNet takes ~45 s to train here


def run_method(name, model, train, test, ks, last):
    """(scores, setup s, {k: query s}, peak memory MB) for one method on one model."""
    memory = {}
    with peak_memory(memory):
        if name in OURS:
            config = OURS[name]
            if config.params == ("LAST",):
                config = config.replace(params=(last,))
            out = ours(config, model, train, test, ks)
        elif name.startswith("Captum"):
            out = captum_fast(model, train, test, ks, last)
        elif name.startswith("traker"):
            out = traker(model, train, test, ks)
        elif name.startswith("Kronfluence"):
            out = kronfluence(model, train, test, ks)
        else:
            out = dattri(name, model, train, test, ks)
    return (*out, memory["peak_mb"])


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


def skipped(setup: str, name: str, quick: bool) -> str | None:
    if (setup, name) in SKIP:
        return SKIP[setup, name]
    if name.startswith("Kronfluence") and importlib.util.find_spec("kronfluence") is None:
        return "kronfluence is not installed (an optional peer: see kronfluence())"
    if quick and "explicit" in name:
        return "--quick"
    return None


ONLY: list[str] = []  # --only: run just the methods whose names contain one of these ("=name": that name alone)


def chosen(name: str) -> bool:
    return not ONLY or any(part in name if part[0] != "=" else part[1:] == name for part in ONLY)


def lds_rows(setup, model, data, last, ks, masks, margins_, quick, repeat=1):
    """One row per chosen method; with `repeat`, each method runs that many times in a row and its
    times are the medians (the scores are the first run's)."""
    x, y, x_test, y_test = data
    rows = []
    for name in [*OURS, *PEERS]:
        if not chosen(name):
            continue
        if why := skipped(setup, name, quick):
            print(f"  {setup} | {name}: skipped, {why}", flush=True)
            continue
        runs = [run_method(name, model, (x, y), (x_test, y_test), ks, last) for _ in range(repeat)]
        scores, peak = runs[0][0], max(run[3] for run in runs)
        prep = statistics.median(run[1] for run in runs)
        times = {k: statistics.median(run[2][k] for run in runs) for k in ks}
        r = {"setup": setup, "method": name, "lds": lds(scores, masks, margins_), "setup_s": prep, "peak_mb": peak}
        r.update({"k=1": times[1], "k=10": times[10], "k=all": times[ks[-1]], "n_test": ks[-1]})
        rows.append(r)
        print(
            f"  {setup} | {name}: LDS {r['lds']:.3f}, setup {prep:.2f} s, query {r['k=1']:.3f} / "
            f"{r['k=10']:.3f} / {r['k=all']:.3f} s, peak +{peak:.0f} MB",
            flush=True,
        )
    return rows


GOVERNANCE = [  # Forward-INF settings run on the mislabeled and leakage tasks, besides the presets
    "Forward-INF linear, no curvature (TracIn-like)",
    "Forward-INF finite Adam lr 1e-3 (paper)",
    "Forward-INF + diag Fisher",
    "Forward-INF + Hessian of last layer",
    PRESET,
    "Forward-INF cosine (unit steps, last-layer norms)",
    "Forward-INF cosine + diag Fisher",
]


def peer_scores(setup, task, name, model, train, test, last):
    """A peer's scores for all of `test`, or None where it fails numerically (said; its cell reads "-")."""
    try:
        return run_method(name, model, train, test, [len(test[1])], last)[0]
    except torch.linalg.LinAlgError as error:
        print(f"  {setup} | {task} | {name}: failed ({error})", flush=True)
        return None


def mislabeled_task(setup, data, train_fn, last, quick) -> dict[str, float]:
    """10% of the training labels flipped, the model retrained; each method ranks training points by
    how much they work against a clean reference set (100 held-out points). ROC AUC."""
    x, y, x_test, y_test = data
    classes = int(y.max()) + 1
    gen = torch.Generator().manual_seed(2)
    flip = torch.randperm(len(y), generator=gen)[: len(y) // 10]
    noisy = y.clone()
    noisy[flip] = (noisy[flip] + torch.randint(1, classes, (len(flip),), generator=gen)) % classes
    is_flipped = np.zeros(len(y), dtype=bool)
    is_flipped[flip.numpy()] = True
    model = train_fn(x, noisy)
    reference = (x_test[-100:], y_test[-100:])
    auc = {}
    with torch.no_grad():  # the loss the mislabeled analysis ranks with (rank_by "loss", "combined")
        loss = F.cross_entropy(model(x), noisy, reduction="none")
    auc["training loss alone (no attribution)"] = roc_auc_score(is_flipped, loss.numpy())
    for name in [*GOVERNANCE, "Forward-INF mislabeled preset", *PEERS]:
        if skipped(setup, name, quick) or "explicit" in name or not chosen(name):
            continue
        if name.startswith("Forward-INF"):
            config = MirrorConfig.preset("mislabeled") if name.endswith("mislabeled preset") else OURS[name]
            config = config.replace(group=True, params=(last,) if config.params == ("LAST",) else config.params)
            fi = ForwardInf(model, Classification(), config).prepare((x, noisy))
            support = fi.scores(reference)[0]
        elif (support := peer_scores(setup, "mislabeled", name, model, (x, noisy), reference, last)) is None:
            continue
        else:
            support = support.sum(0)
        auc[name] = roc_auc_score(is_flipped, -support.numpy())
        print(f"  {setup} | mislabeled | {name}: AUC {auc[name]:.3f}", flush=True)
        if name.endswith("mislabeled preset"):  # the service's rankings from the loss and this harm
            combined = rankdata(loss.numpy()) + rankdata(-support.numpy())
            auc["training loss + mislabeled preset, ranks summed (`combined`)"] = roc_auc_score(is_flipped, combined)
            calibration = fi.calibration(reference)
            calibrated = fi.calibrated_log_probabilities(calibration).double().exp()
            p = p_wrong(calibrated, noisy, -support.double(), calibration.confusion)[0]
            auc["p_wrong: calibrated loss updated by the preset's harm (`posterior`, the default)"] = roc_auc_score(
                is_flipped, p.numpy()
            )
    return auc


def leakage_task(setup, data, train_fn, last, quick) -> dict[str, tuple[float, float]]:
    """40 test points planted in the training set, the model retrained: the rate at which each
    method ranks the planted duplicate first / in its top 5 for the test point."""
    x, y, x_test, y_test = data
    x_leak, y_leak = torch.cat([x, x_test[:40]]), torch.cat([y, y_test[:40]])
    model = train_fn(x_leak, y_leak)
    test = (x_test[:40], y_test[:40])
    duplicate = torch.arange(len(x), len(x_leak))
    rates = {}
    for name in ["Forward-INF leakage preset", *GOVERNANCE, *PEERS]:
        if skipped(setup, name, quick) or "explicit" in name or not chosen(name):
            continue
        if name == "Forward-INF leakage preset":
            scores = ForwardInf(model, Classification(), MirrorConfig.preset("leakage")).prepare((x_leak, y_leak))
            scores = scores.scores(test)
        elif (scores := peer_scores(setup, "leakage", name, model, (x_leak, y_leak), test, last)) is None:
            continue
        rank = (scores > scores.gather(1, duplicate[:, None])).sum(1)
        rates[name] = ((rank == 0).float().mean().item(), (rank < 5).float().mean().item())
        print(f"  {setup} | leakage | {name}: top-1 {rates[name][0]:.3f}, top-5 {rates[name][1]:.3f}", flush=True)
    return rates


LOO_LAMBDAS = (1e-2, 1e-3, 1e-4)  # the logistic regression's L2: damping "auto" must find it itself


def loo_task() -> dict[str, list[float]]:
    """Convex L2 logistic regression on 300 digits, for each L2 strength in LOO_LAMBDAS: mean Pearson
    with exact leave-one-out effects over the 10 test points of highest loss."""
    x, y, x_test, y_test = digits()
    xl, yl = x[:300].double(), y[:300]
    loo: dict[str, list[float]] = {}
    for lam in LOO_LAMBDAS:
        logistic = fit_logistic(xl, yl, lam=lam)
        hard = F.cross_entropy(logistic(x_test.double()), y_test, reduction="none").detach().topk(10).indices
        truth = leave_one_out(logistic, xl, yl, x_test[hard], y_test[hard], lam=lam)
        for name in [
            "Forward-INF linear, no curvature (TracIn-like)",
            "Forward-INF finite Adam lr 1e-3 (paper)",
            PRESET,
            "Forward-INF + exact Hessian, damping 1e-2 (the preset before damping 'auto')",
            "dattri TracIn (Grad-Dot)",
            "dattri IF (CG)",
        ]:
            if name in OURS or name.startswith("Forward-INF"):
                config = OURS.get(name, MirrorConfig(precondition="hessian", damping=1e-2)).replace(dtype="float64")
                scores = ForwardInf(logistic, Classification(), config).prepare((xl, yl))
                scores = scores.scores((x_test[hard].double(), y_test[hard]))
            else:
                scores = dattri(name, logistic.float(), (xl.float(), yl), (x_test[hard], y_test[hard]), [10])[0]
                logistic.double()
            pearson = [np.corrcoef(s, t)[0, 1] for s, t in zip(scores.double().numpy(), truth.numpy(), strict=True)]
            loo.setdefault(name, []).append(float(np.mean(pearson)))
    return loo


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "dattri", "captum", "traker"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument(
        "--only", default="", help="just the methods whose names contain one of these (a,b; =name: that one)"
    )
    parser.add_argument("--part", choices=("all", "lds", "tasks"), default="all", help="tasks: mislabeled and leakage")
    parser.add_argument("--setups", default="", help="just the setups whose names contain one of these (a,b)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each method this many times in a row: medians (sub-second setups)"
    )
    args = parser.parse_args()
    ONLY.extend(part for part in args.only.split(",") if part)
    began = time.perf_counter()
    n_models, n_test = (24, 40) if args.quick else (100, 100)
    torch.manual_seed(0)
    ForwardInf(torch.nn.Linear(2, 2), Classification(), MirrorConfig()).prepare(  # torch.func's one-off start-up
        (torch.rand(4, 2), torch.tensor([0, 1, 0, 1]))
    ).scores((torch.rand(1, 2), torch.tensor([1])))
    print(f"# {n_models} LDS models per setup, up to {n_test} test points; {versions()}")
    rows, auc, leak = [], {}, {}
    for setup, (load, train_fn, last) in SETUPS.items():
        if args.quick and ("CNN" in setup or setup == RESNET):
            continue
        if args.setups and not any(part in setup for part in args.setups.split(",")):
            continue
        data = load()
        x, y, x_test, y_test = data
        if args.part != "tasks":
            ks = [1, 10, min(n_test, len(y_test))]
            models = n_models if args.quick else MODELS.get(setup, n_models)
            masks, margins_ = lds_truth(
                setup, train_fn, x, y, x_test[:n_test], y_test[:n_test], models, args.regenerate
            )
            model = train_fn(x, y)
            data_ = (x, y, x_test[:n_test], y_test[:n_test])
            rows += lds_rows(setup, model, data_, last, ks, masks, margins_, args.quick, args.repeat)
        if args.part != "lds":
            auc[setup] = mislabeled_task(setup, data, train_fn, last, args.quick)
            leak[setup] = leakage_task(setup, data, train_fn, last, args.quick)
    loo = loo_task() if args.part != "lds" and not ONLY else {}

    print("\n## LDS, time and memory\n")
    print("| setup | method | LDS | setup s | query s, k=1 | k=10 | k=all (n) | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setup']} | {r['method']} | {r['lds']:.3f} | {r['setup_s']:.3f} | {r['k=1']:.3f} | "
            f"{r['k=10']:.3f} | {r['k=all']:.3f} ({r['n_test']}) | {r['peak_mb']:.0f} |"
        )
    print("\n## Convex leave-one-out (L2 logistic regression, 300 points, 10 high-loss test points)\n")
    print(f"| method | {' | '.join(f'L2 {lam:g}' for lam in LOO_LAMBDAS)} |\n|---|{'---|' * len(LOO_LAMBDAS)}")
    for name, values in loo.items():
        print(f"| {name} | {' | '.join(f'{v:.3f}' for v in values)} |")
    setups = list(auc)
    print("\n## Mislabeled detection (10% flipped, clean reference set of 100), ROC AUC\n")
    print(f"| method | {' | '.join(setups)} |\n|---|{'---|' * len(setups)}")
    for name in dict.fromkeys(n for s in setups for n in auc[s]):
        print(f"| {name} | {' | '.join(f'{auc[s][name]:.3f}' if name in auc[s] else '-' for s in setups)} |")
    print("\n## Leakage (40 planted duplicates), top-1 / top-5\n")
    print(f"| method | {' | '.join(setups)} |\n|---|{'---|' * len(setups)}")
    for name in dict.fromkeys(n for s in setups for n in leak[s]):
        cells = [f"{leak[s][name][0]:.3f} / {leak[s][name][1]:.3f}" if name in leak[s] else "-" for s in setups]
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\n# {(time.perf_counter() - began) / 60:.1f} min")
    if not ONLY and args.part == "all" and not args.setups:  # a partial run leaves the committed plot alone
        plot(rows, "quick" if args.quick else "full")


LABELLED = {PRESET, "Forward-INF linear, no curvature (TracIn-like)", "Forward-INF finite Adam lr 1e-3 (paper)"}


def plot(rows, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(r["setup"] for r in rows))
    fig, axes = plt.subplots(1, len(setups), figsize=(6 * len(setups), 5), squeeze=False)
    for ax, setup in zip(axes[0], setups, strict=True):
        for r in (r for r in rows if r["setup"] == setup):
            total = r["setup_s"] + r["k=all"]
            ours_ = r["method"].startswith("Forward-INF")
            ax.scatter(total, r["lds"], marker="o" if ours_ else "s", color="tab:blue" if ours_ else "tab:orange")
            if ours_ and r["method"] not in LABELLED:
                continue  # the other Forward-INF settings stay unlabelled dots: the table names them
            short = r["method"].replace("Forward-INF", "FI").replace(" (1 checkpoint)", "")
            ax.annotate(short, (total, r["lds"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"seconds for {rows[0]['n_test']} test points (setup + query), 2 CPU cores")
        ax.set_ylabel("LDS (Spearman)")
        ax.set_title(setup, fontsize=10)
    fig.suptitle(f"Attribution quality against time ({label} run; blue: Forward-INF, orange: peers)")
    fig.tight_layout()
    path = DOCS / "lds-vs-time.png" if label == "full" else OUT / "lds-vs-time-quick.png"  # docs show the full run
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"# plot: {path}")


if __name__ == "__main__":
    main()
