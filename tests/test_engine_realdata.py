"""The engine on real data (scikit-learn's bundled digits): convex leave-one-out and planted leakage."""

import pytest
import torch
import torch.nn.functional as F

from bench.groundtruth import fit_logistic, leave_one_out
from worker.demo import digits, digits_mlp
from worker.forward_inf import Classification, ForwardInf, MirrorConfig, attribute


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.mark.slow
def test_convex_leave_one_out_correlation(data):
    x, y, x_test, y_test = data
    x, y = x[:300].double(), y[:300]
    model = fit_logistic(x, y)
    test_loss = F.cross_entropy(model(x_test.double()), y_test, reduction="none").detach()
    hard = test_loss.topk(5).indices  # high-loss test points: the ones whose attributions matter
    truth = leave_one_out(model, x, y, x_test[hard], y_test[hard])
    test = (x_test[hard].double(), y_test[hard])

    def mean_pearson(scores):
        return torch.stack(
            [torch.corrcoef(torch.stack([s, t]))[0, 1] for s, t in zip(scores, truth, strict=True)]
        ).mean()

    linear = mean_pearson(attribute(model, Classification(), (x, y), test, MirrorConfig.preset("testing")))
    finite = mean_pearson(
        attribute(model, Classification(), (x, y), test, MirrorConfig.preset("testing", mode="finite", lr=1e-2))
    )
    # the training objective's L2 (lam=1e-2 on the weights) is the damping of the exact Hessian
    influence = mean_pearson(
        attribute(
            model, Classification(), (x, y), test, MirrorConfig.preset("testing", precondition="hessian", damping=1e-2)
        )
    )
    print(f"convex LOO Pearson: linear {linear:.3f}, finite {finite:.3f}, hessian-preconditioned {influence:.3f}")
    assert linear >= 0.4
    assert finite >= 0.4
    assert influence >= 0.9


@pytest.mark.slow
def test_leakage_preset_finds_planted_duplicates(data):
    x, y, x_test, y_test = data
    planted = torch.arange(20)
    x_train, y_train = torch.cat([x, x_test[planted]]), torch.cat([y, y_test[planted]])
    duplicate = torch.arange(len(x), len(x_train))
    model = digits_mlp(x_train, y_train)
    fi = ForwardInf(model, Classification(), MirrorConfig.preset("leakage")).prepare((x_train, y_train))
    scores = fi.scores((x_test[planted], y_test[planted]))
    rank = (scores > scores.gather(1, duplicate[:, None])).sum(1)  # 0 = the duplicate is top-1
    print(f"leakage: top-1 {(rank == 0).sum()}/20, top-5 {(rank < 5).sum()}/20")
    assert (rank == 0).sum() >= 18
    assert (rank < 5).sum() >= 19
    # plain gradient dot products miss memorised duplicates (why the preset differs)
    tracin = ForwardInf(model, Classification(), MirrorConfig(precondition="none")).prepare((x_train, y_train))
    dot = tracin.scores((x_test[planted], y_test[planted]))
    assert ((dot > dot.gather(1, duplicate[:, None])).sum(1) == 0).sum() < 18
