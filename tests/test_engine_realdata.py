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


def mean_pearson(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The mean over test points of the Pearson correlation of their scores with their true effects."""
    return torch.stack([torch.corrcoef(torch.stack([s, t]))[0, 1] for s, t in zip(scores, truth, strict=True)]).mean()


@pytest.mark.parametrize("precondition", ["hessian", "kfac"])
def test_auto_damping_is_the_weight_decay_the_model_was_trained_with(data, precondition):
    """At the optimum of mean cross-entropy + lam/2 |W|^2 the loss gradient is -lam W: damping "auto"
    reads lam off the model, so the step is the exact influence function's without being told lam. The
    bias is not decayed (its gradient is ~0): the exact Hessian damps it at the floor only, as the training
    objective's Hessian has it; Kronecker factors take one damping for all."""
    from worker.forward_inf.curvature import DAMPING_FLOOR

    x, y, x_test, y_test = data
    x, y = x[:300].double(), y[:300]
    test = (x_test[:3].double(), y_test[:3])
    for lam in (1e-2, 1e-3):
        model = fit_logistic(x, y, lam=lam)
        fi = ForwardInf(model, Classification(), MirrorConfig(precondition=precondition, dtype="float64"))
        scores = fi.prepare((x, y)).scores(test)
        ran = fi.execution()
        assert ran["curvature"]["damping"] == pytest.approx(lam, rel=1e-3)
        assert any(note.startswith("damping 'auto'") for note in ran["notes"])
        if precondition == "kfac":
            told = attribute(model, Classification(), (x, y), test, fi.config.replace(damping=lam))
            torch.testing.assert_close(scores, told, rtol=1e-3, atol=1e-9)
            continue
        c = fi.curvature
        assert "damped at the floor only: linear.bias" in " ".join(ran["notes"])
        assert c.free.tolist() == [False] * 640 + [True] * 10  # linear.weight (10, 64), then linear.bias
        floor = DAMPING_FLOOR * float(c.raw.diagonal().mean())
        shift = torch.where(c.free, floor, ran["curvature"]["damping"])
        torch.testing.assert_close(c.factor @ c.factor.T, c.raw + torch.diag(shift))


def test_auto_damping_damps_a_decayed_bias_like_the_weights(data):
    """Trained to the optimum of cross-entropy + lam/2 |theta|^2, the bias included: its gradient is
    -lam b, so it is not taken for undecayed and the whole Hessian gets lam."""
    x, y, _, _ = data
    x, y = x[:200].double(), y[:200]
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + 1e-2 / 2 * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(objective)
    fi = ForwardInf(model, Classification(), MirrorConfig(precondition="hessian", dtype="float64")).prepare((x, y))
    assert fi.curvature.free is None and fi.execution()["curvature"]["damping"] == pytest.approx(1e-2, rel=1e-3)
    assert "not decayed" not in " ".join(fi.execution()["notes"])


def test_auto_damping_away_from_an_l2_optimum(data):
    """An MLP trained by Adam without weight decay: its gradient is not along -W, so the exact Hessian is
    damped by the measured default and EK-FAC by -g.W/|W|^2 (docs/benchmarks.md, "Damping")."""
    from worker.forward_inf.curvature import DAMPING_DEFAULT

    x, y, _, _ = data
    x, y = x[:300], y[:300]
    model = digits_mlp(x, y, hidden=8, epochs=100)
    hessian = ForwardInf(model, Classification(), MirrorConfig(precondition="hessian")).prepare((x, y)).execution()
    ekfac = ForwardInf(model, Classification(), MirrorConfig(precondition="ekfac")).prepare((x, y)).execution()
    assert hessian["curvature"]["damping"] == DAMPING_DEFAULT
    assert "not at an L2 optimum" in " ".join(hessian["notes"]) and "not at an L2 optimum" in " ".join(ekfac["notes"])
    assert 0 < ekfac["curvature"]["damping"] < DAMPING_DEFAULT


@pytest.mark.slow
def test_convex_leave_one_out_correlation(data):
    x, y, x_test, y_test = data
    x, y = x[:300].double(), y[:300]
    model = fit_logistic(x, y)
    test_loss = F.cross_entropy(model(x_test.double()), y_test, reduction="none").detach()
    hard = test_loss.topk(5).indices  # high-loss test points: the ones whose attributions matter
    truth = leave_one_out(model, x, y, x_test[hard], y_test[hard])
    test = (x_test[hard].double(), y_test[hard])

    linear = mean_pearson(attribute(model, Classification(), (x, y), test, MirrorConfig.preset("testing")), truth)
    finite = mean_pearson(
        attribute(model, Classification(), (x, y), test, MirrorConfig.preset("testing", mode="finite", lr=1e-2)), truth
    )
    # the training objective's L2 (lam=1e-2 on the weights) is the damping of the exact Hessian
    influence = mean_pearson(
        attribute(
            model, Classification(), (x, y), test, MirrorConfig.preset("testing", precondition="hessian", damping=1e-2)
        ),
        truth,
    )
    print(f"convex LOO Pearson: linear {linear:.3f}, finite {finite:.3f}, hessian-preconditioned {influence:.3f}")
    assert linear >= 0.4
    assert finite >= 0.4
    assert influence >= 0.9


@pytest.mark.slow
def test_the_default_is_the_exact_influence_function_at_l2_1e_3(data):
    """The goal's setting (convex, L2 1e-3, no damping given): the default's leave-one-out Pearson is
    >= 0.95 (0.960 on these 5, 0.965 on bench.quality's 10), above damping the undecayed bias by lam (0.934)."""
    x, y, x_test, y_test = data
    x, y = x[:300].double(), y[:300]
    model = fit_logistic(x, y, lam=1e-3)
    hard = F.cross_entropy(model(x_test.double()), y_test, reduction="none").detach().topk(5).indices
    truth = leave_one_out(model, x, y, x_test[hard], y_test[hard], lam=1e-3)
    test = (x_test[hard].double(), y_test[hard])
    default, everywhere = (
        mean_pearson(attribute(model, Classification(), (x, y), test, config), truth)
        for config in (
            MirrorConfig(dtype="float64"),
            MirrorConfig(dtype="float64", precondition="hessian", damping=1e-3),
        )
    )
    assert default >= 0.95 and default > everywhere


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
