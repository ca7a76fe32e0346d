"""The Forward-INF engine against brute force, on tiny models (float64 where exactness is asserted)."""

import pytest
import torch
import torch.nn.functional as F

from worker.demo import digits, digits_mlp, train_classifier
from worker.forward_inf import (
    AttributionInputError,
    CausalLM,
    Classification,
    Diffusion,
    ForwardInf,
    MirrorConfig,
    Regression,
    attribute,
    build,
)
from worker.forward_inf.curvature import LOWRANK_TOLERANCE, Indefinite, _nystrom, top_eigen
from worker.forward_inf.layers import linear_layers, weights
from worker.forward_inf.mirror import Functional
from worker.forward_inf.sweep import PROBE_SHARE


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = build("mlp", {"in_features": 6, "hidden": [8], "out_features": 3, "activation": "tanh"}).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    return model, x, y


def per_sample_grads(model, x, y):
    """(N, P) gradients by a plain autograd loop: the reference."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_linear_sgd_equals_lr_times_gradient_dot_products(problem):
    model, x, y = problem
    grads = per_sample_grads(model, x, y)
    config = MirrorConfig.preset("testing", lr=0.01)
    scores = attribute(model, Classification(), (x, y), (x[:5], y[:5]), config)
    assert scores.shape == (5, 40)
    torch.testing.assert_close(scores, 0.01 * grads[:5] @ grads.T, rtol=1e-5, atol=0)


def test_finite_sgd_small_step_matches_gradient_dot_products(problem):
    model, x, y = problem
    grads = per_sample_grads(model, x, y)
    config = MirrorConfig.preset("testing", mode="finite", lr=1e-5)
    scores = attribute(model, Classification(), (x, y), (x[:5], y[:5]), config) / 1e-5
    ref = grads[:5] @ grads.T
    for j in range(5):
        assert torch.corrcoef(torch.stack([scores[j], ref[j]]))[0, 1] >= 0.9999


def test_descent_has_the_same_sign_convention(problem):
    model, x, y = problem
    config = MirrorConfig.preset("testing", mode="finite", lr=1e-6)
    up = attribute(model, Classification(), (x, y), (x[:3], y[:3]), config)
    down = attribute(model, Classification(), (x, y), (x[:3], y[:3]), config.replace(direction="descent"))
    torch.testing.assert_close(up, down, rtol=1e-3, atol=1e-12)
    assert (up.gather(1, torch.arange(3)[:, None]) > 0).all()  # a point supports itself


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "signsgd"])
@pytest.mark.parametrize("mode", ["finite", "linear"])
def test_test_points_swept_together_equal_separate_calls(problem, optimizer, mode):
    model, x, y = problem
    config = MirrorConfig.preset("testing", optimizer=optimizer, mode=mode, steps=2, lr=1e-3, max_param_sets=3)
    fi = ForwardInf(model, Classification(), config).prepare((x, y))
    together = fi.scores((x[:8], y[:8]))
    apart = torch.cat([fi.scores((x[j : j + 1], y[j : j + 1])) for j in range(8)])
    torch.testing.assert_close(together, apart, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("mode", ["finite", "linear"])
def test_stacking_strategies_agree(problem, mode, k):
    model, x, y = problem
    config = MirrorConfig.preset("testing", mode=mode, optimizer="adam", batch_size=16)
    results, used = {}, {}
    for way in ("vmap", "loop", "layers", "auto"):
        fi = ForwardInf(model, Classification(), config.replace(stacking=way)).prepare((x, y))
        results[way], used[way] = fi.scores((x[:k], y[:k])), fi.execution()["stacking"]
    for way in ("vmap", "layers", "auto"):
        torch.testing.assert_close(results[way], results["loop"], rtol=1e-10, atol=1e-15)
    # the layers' terms from one backward pass where the mode is linear (every parameter is a Linear's)
    assert used["layers"] == ("layers" if mode == "linear" else "single" if k == 1 else "loop")
    assert used["vmap"] == ("single" if k == 1 else "vmap")


@pytest.mark.parametrize("precondition", ["none", "diag"])
def test_the_layers_way_multiplies_low_rank_tangents_as_factors(problem, precondition):
    """A plain gradient step on one record moves each linear layer's weight by a rank-1 matrix (delta a^T):
    the layers way keeps it as factors (u, v) and its scores equal the jvp's; a diagonal preconditioner
    rescales it entry by entry (dense)."""
    model, x, y = problem
    config = MirrorConfig.preset("testing", precondition=precondition, damping=0.1, batch_size=16)
    fi = ForwardInf(model, Classification(), config.replace(stacking="layers")).prepare((x, y))
    first = fi.mirror((x[:5], y[:5])).first
    kept = weights(linear_layers(fi.fm), first)
    assert [w.u is not None for w in kept.values()] == [precondition == "none"] * 2
    if precondition == "none":
        assert all(w.u.shape == (5, w.dense.shape[1], 1) for w in kept.values())  # rank 1 per test point
    loop = ForwardInf(model, Classification(), config.replace(stacking="loop")).prepare((x, y))
    torch.testing.assert_close(fi.scores((x[:5], y[:5])), loop.scores((x[:5], y[:5])), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("way", ["loop", "layers"])
def test_autocast_sweeps_in_reduced_precision_close_to_full(way):
    """bfloat16 autocast: the sweep runs in it (the scores differ from full precision's), the scores come
    back in the model's dtype and keep their order to bf16's rounding; finite mode refuses it."""
    torch.manual_seed(0)
    model = build("mlp", {"in_features": 16, "hidden": [32], "out_features": 4})
    x, y = torch.randn(300, 16), torch.randint(0, 4, (300,))
    config = MirrorConfig(precondition="none", stacking=way)
    full = ForwardInf(model, Classification(), config).prepare((x, y)).scores((x[:3], y[:3]))
    fi = ForwardInf(model, Classification(), config.replace(autocast="bfloat16")).prepare((x, y))
    reduced = fi.scores((x[:3], y[:3]))
    assert reduced.dtype == torch.float32 and not torch.equal(reduced, full)
    assert ((reduced - full).norm() / full.norm()) < 0.02
    for a, b in zip(full, reduced, strict=True):
        assert len(set(a.topk(10).indices.tolist()) & set(b.topk(10).indices.tolist())) >= 8
    with pytest.raises(AttributionInputError, match="autocast needs mode='linear'"):
        MirrorConfig(mode="finite", autocast="bfloat16")


class BatchMixing(torch.nn.Module):
    """A Linear on each record plus the batch's mean: a record's loss depends on the others in its batch."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(6, 3)

    def forward(self, x):
        out = self.layer(x)
        return out + out.mean(0)


def test_the_layers_way_is_chosen_only_where_it_agrees_with_the_jvp(problem):
    """ "layers" reads each record's gradient from its batch's summed loss: where records interact, "auto"
    finds it differs from the jvp on its probe and keeps a jvp way."""
    _, x, y = problem
    torch.manual_seed(0)
    model = BatchMixing().double()
    config = MirrorConfig.preset("testing", batch_size=16)
    scores = {}
    for way in ("loop", "layers", "auto"):
        fi = ForwardInf(model, Classification(), config.replace(stacking=way)).prepare((x, y))
        scores[way] = fi.scores((x[:3], y[:3]))
    assert not torch.allclose(scores["layers"], scores["loop"], rtol=1e-3)  # pinned, it is wrong here
    assert fi.execution()["stacking"] in ("vmap", "loop")
    torch.testing.assert_close(scores["auto"], scores["loop"], rtol=1e-10, atol=1e-15)


def test_the_layers_way_leaves_out_tied_and_nonlinear_parameters():
    tied = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert linear_layers(Functional(tied, ("*",))) is None  # the weight reaches the loss through the embedding too
    mlp = build("mlp", {"in_features": 6, "hidden": [8], "out_features": 3})
    assert [layer.module for layer in linear_layers(Functional(mlp, ("*",)))] == ["net.1", "net.3"]
    norm = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6))
    assert linear_layers(Functional(norm, ("*",))) is None
    assert linear_layers(Functional(norm, ("0.*",))) is not None


def test_the_stacking_choice_is_timed_on_a_slice_of_the_first_batch(problem):
    """ "auto" times each way twice (a warm-up, then timed) on PROBE_SHARE of the first batch, then sweeps
    the batch once by the faster: a large model does not pay four full batches for the choice."""
    model, x, y = problem
    config = MirrorConfig.preset("testing", mode="finite", batch_size=16)
    fi = ForwardInf(model, Classification(), config).prepare((x, y))
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    fi.scores((x[:5], y[:5]))  # 5 parameter sets over batches of 16, 16, 8
    probe = round(16 * PROBE_SHARE)
    assert seen.count(probe) == 2 + 2 * 5  # vmap: one forward per call; the loop: one per parameter set
    assert seen.count(16) in (2, 2 * 5)  # each full batch once, by the way chosen


def test_base_losses_are_computed_once_per_training_point(problem):
    model, x, y = problem
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    config = MirrorConfig.preset("testing", mode="finite", batch_size=16, stacking="vmap")
    fi = ForwardInf(model, Classification(), config)
    fi.prepare([(x[:25], y[:25]), (x[25:], y[25:])])
    assert sum(seen) == 40
    torch.testing.assert_close(fi.base, F.cross_entropy(model(x), y, reduction="none").detach())
    seen.clear()
    fi.scores((x[:2], y[:2]))
    fi.scores((x[2:4], y[2:4]))
    # per query: the test points (a batch of 2, vmapped single points) and one sweep of the 40 training
    # points (batches of 16, 9, 15); no base losses again
    assert sum(s for s in seen if s > 2) == 2 * 40


def test_group_mode_is_one_step_on_the_mean_loss(problem):
    model, x, y = problem
    config = MirrorConfig.preset("testing", group=True)
    grads = per_sample_grads(model, x, y)
    scores = attribute(model, Classification(), (x, y), (x[:6], y[:6]), config)
    assert scores.shape == (1, 40)
    torch.testing.assert_close(scores[0], config.lr * grads @ grads[:6].mean(0), rtol=1e-5, atol=0)


def test_parameter_globs_perturb_only_those_parameters(problem):
    model, x, y = problem
    config = MirrorConfig.preset("testing", params=("net.3.*",))
    scores = attribute(model, Classification(), (x, y), (x[:2], y[:2]), config)
    grads = per_sample_grads(model, x, y)
    last = sum(p.numel() for p in model.net[3].parameters())
    torch.testing.assert_close(scores, config.lr * grads[:2, -last:] @ grads[:, -last:].T, rtol=1e-5, atol=0)


def test_memorised_test_point_is_flagged_and_its_sgd_step_normalised(problem):
    model, x, y = problem
    with torch.no_grad():
        model.net[3].bias[:] = torch.tensor([0.0, 0.0, 60.0])  # class 2 becomes certain: loss ~ 0
    test = (x[:4], torch.full((4,), 2))
    fi = ForwardInf(model, Classification(), MirrorConfig.preset("testing", safeguard="normalize")).prepare((x, y))
    mirror = fi.mirror(test)
    assert mirror.memorized.all()
    assert len(mirror.notes) == 1 and "4 row(s)" in mirror.notes[0] and "unit norm" in mirror.notes[0]  # said
    scores = fi.sweep(mirror)
    unguarded_fi = ForwardInf(model, Classification(), MirrorConfig.preset("testing")).prepare((x, y))
    assert unguarded_fi.mirror(test).notes == ()  # nothing repaired, nothing said
    unguarded = unguarded_fi.scores(test)
    assert scores.abs().max() > 1e6 * unguarded.abs().max()  # the row carries a usable signal again
    # same ranking, rescaled: the direction of the gradient is kept
    assert torch.equal(scores.argsort(1), unguarded.argsort(1))


def test_match_score_puts_an_exact_duplicate_first(problem):
    model, x, y = problem
    config = MirrorConfig.preset("leakage", dtype="float64")
    scores = attribute(model, Classification(), (x, y), (x[7:9], y[7:9]), config)
    assert scores.argmax(1).tolist() == [7, 8]
    assert scores[:, [7, 8]].diagonal().abs().max() < 1e-9


def test_relative_score_is_the_log_loss_change(problem):
    model, x, y = problem
    config = MirrorConfig.preset("testing", mode="finite", lr=1e-3)
    fi = ForwardInf(model, Classification(), config).prepare((x, y))
    plain = fi.scores((x[:3], y[:3]))
    fi.config = config.replace(score="relative")
    torch.testing.assert_close(fi.scores((x[:3], y[:3])), plain / fi.base[None])


@pytest.mark.parametrize("truth", [0.5, 2.5])
def test_calibration_fits_the_temperature_and_offsets_that_generated_the_labels(problem, truth):
    """Reference labels drawn from softmax(logits / truth + offsets): the fitted T is truth to within 5%,
    the fitted offsets are the true ones up to the shift softmax ignores, the training log-probabilities
    are the log-softmax of the calibrated logits, and the confusion's row k is the mean calibrated
    probabilities of the reference points labelled k, with one pseudo-count on the diagonal."""
    model, x, y = problem
    torch.manual_seed(1)
    ref_x = 3 * torch.randn(20_000, 6, dtype=torch.float64)
    offsets = torch.tensor([0.8, -0.4, -0.4], dtype=torch.float64)  # leans away from class 0 (sums to 0)
    with torch.no_grad():
        ref_y = torch.distributions.Categorical(logits=model(ref_x) / truth + offsets).sample()
    fi = ForwardInf(model, Classification(), MirrorConfig.preset("testing")).prepare((x, y))
    fitted = fi.calibration((ref_x, ref_y))
    assert abs(fitted.temperature / truth - 1) < 0.05
    bias = torch.tensor(fitted.bias, dtype=torch.float64)
    torch.testing.assert_close(bias - bias.mean(), offsets, atol=0.1, rtol=0)
    with torch.no_grad():
        expected = (model(x) / fitted.temperature + bias).log_softmax(1)
        reference = (model(ref_x) / fitted.temperature + bias).softmax(1)
    torch.testing.assert_close(fi.calibrated_log_probabilities(fitted), expected)
    confusion = torch.stack(
        [(reference[ref_y == k].sum(0) + torch.eye(3)[k]) / ((ref_y == k).sum() + 1) for k in range(3)]
    )
    torch.testing.assert_close(torch.tensor(fitted.confusion, dtype=torch.float64), confusion.double())


def test_a_calibration_from_a_handful_of_reference_points_stays_near_the_identity(problem):
    model, x, y = problem
    with torch.no_grad():
        right = model(x).argmax(1)  # labels the model gets right: the likelihood alone wants T -> 0
    fi = ForwardInf(model, Classification(), MirrorConfig.preset("testing")).prepare((x, y))
    few, many = fi.calibration((x[:2], right[:2])), fi.calibration((x, right))
    assert 0.37 < few.temperature < 1 and max(map(abs, few.bias)) < 1
    assert many.temperature < few.temperature


def test_regression_task(problem):
    model, x, _ = problem
    targets = torch.randn(40, 3, dtype=torch.float64)
    scores = attribute(model, Regression(), (x, targets), (x[:3], targets[:3]), MirrorConfig.preset("testing"))
    assert scores.shape == (3, 40) and torch.isfinite(scores).all()
    assert (scores[:, :3].diagonal() > 0).all()  # lr * |g|^2: each point supports itself


def test_causal_lm_task_honours_the_target_mask():
    torch.manual_seed(0)
    model = build("gpt", {"vocab_size": 11, "block_size": 8, "d_model": 16, "n_layer": 1, "n_head": 2})
    tokens = torch.randint(0, 11, (12, 8))
    query = tokens[:2].clone()
    mask = torch.zeros_like(query)
    mask[:, 5:] = 1  # only the completion counts
    plain = MirrorConfig(precondition="none")
    scores = attribute(model, CausalLM(), tokens, (query, mask), plain.replace(max_param_sets=1))
    assert scores.shape == (2, 12) and torch.isfinite(scores).all()
    changed = query.clone()
    changed[:, 1:5] = (changed[:, 1:5] + 1) % 11  # the prompt changes, so the completion's loss does too
    other = attribute(model, CausalLM(), tokens, (changed, mask), plain)
    assert not torch.allclose(scores, other)
    full = attribute(model, CausalLM(), tokens, query, plain)
    assert not torch.allclose(scores, full)  # the mask matters


def test_diffusion_task_is_deterministic():
    torch.manual_seed(0)
    model = build("unet", {"in_channels": 1, "width": 8, "time_dim": 8})
    images = torch.rand(10, 1, 8, 8)
    # one stacking: "auto" times vmap against a loop per engine, and the two agree only to float rounding
    config = MirrorConfig(mode="finite", optimizer="adam", lr=1e-3, precondition="none", stacking="vmap")
    first = attribute(model, Diffusion(draws=2), images, images[:2], config)
    second = attribute(model, Diffusion(draws=2), images, images[:2], config)
    assert first.shape == (2, 10) and torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_cnn_on_images_runs_end_to_end():
    torch.manual_seed(0)
    model = build("cnn", {"in_channels": 1, "num_classes": 10, "width": 4, "image_size": 8})
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    scores = attribute(
        model,
        Classification(),
        (x, y),
        (x[:3], y[:3]),
        MirrorConfig(mode="finite", optimizer="adam", precondition="none"),
    )
    assert scores.shape == (3, 16) and torch.isfinite(scores).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, y: ((x[:, :5], y), (x[:2, :5], y[:2])), "cannot process"),
        (lambda x, y: ((x, y.double()), (x[:2], y[:2])), "integer class labels"),
        (lambda x, y: ((x, y + 5), (x[:2], y[:2])), "outside 0..2"),
        (lambda x, y: ((x[:0], y[:0]), (x[:2], y[:2])), "empty"),
        (lambda x, y: ((x.masked_fill(x > 2, float("nan")), y), (x[:2], y[:2])), "NaN"),
        (lambda x, y: ((x, y), (x[:2].masked_fill(x[:2] > 0, float("inf")), y[:2])), "test set has NaN or infinite"),
        (lambda x, y: ((x, y[:30]), (x[:2], y[:2])), "differ in length"),
        (lambda x, y: (iter([(x, y)]), (x[:2], y[:2])), "one-shot iterator"),
        (lambda x, y: ((x, y), "text"), "cannot read a batch"),
        (lambda x, y: (x, (x[:2], y[:2])), "targets are required"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(problem, change, message):
    model, x, y = problem
    train, test = change(x, y)
    with pytest.raises(AttributionInputError, match=message):
        attribute(model, Classification(), train, test, MirrorConfig.preset("testing"))


def test_bad_settings_are_refused(problem):
    model, x, y = problem
    with pytest.raises(AttributionInputError, match="matches none"):
        ForwardInf(model, Classification(), MirrorConfig(params=("encoder.*",)))
    with pytest.raises(AttributionInputError, match="optimizer"):
        MirrorConfig(optimizer="rmsprop")
    with pytest.raises(AttributionInputError, match="steps"):
        MirrorConfig(steps=0)
    with pytest.raises(AttributionInputError, match="unknown preset"):
        MirrorConfig.preset("fastest")
    with pytest.raises(AttributionInputError, match="unknown builtin"):
        build("resnet50")


@pytest.mark.parametrize("kind", ["hessian", "diag"])
def test_preconditioned_linear_scores_are_influence_function_scores(problem, kind):
    model, x, y = problem
    grads = per_sample_grads(model, x, y)
    params = list(model.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def mean_loss(v):
        chunks, at = [], 0
        for p in params:
            chunks.append(v[at : at + p.numel()].reshape(p.shape))
            at += p.numel()
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, dict(zip(names, chunks, strict=True)), (x,))
        return F.cross_entropy(out, y)

    damping = 0.05
    if kind == "hessian":
        hessian = torch.autograd.functional.hessian(mean_loss, flat)
        values, vectors = torch.linalg.eigh(hessian)
        assert values.min() < -damping  # this tanh MLP is not convex: the positive part is used
        curvature = (vectors * values.clamp_min(0)) @ vectors.T + damping * torch.eye(len(flat), dtype=flat.dtype)
    else:
        curvature = torch.diag(grads.pow(2).mean(0) + damping)
    config = MirrorConfig.preset("testing", precondition=kind, damping=damping, lr=0.01)
    scores = attribute(model, Classification(), (x, y), (x[:4], y[:4]), config)
    expected = 0.01 * grads @ torch.linalg.solve(curvature, grads[:4].T)  # (N, 4): g_i . H^-1 g_j
    torch.testing.assert_close(scores, expected.T, rtol=1e-6, atol=1e-12)


def test_a_model_below_chance_on_the_reference_set_is_refused(problem):
    """A model that answers one class for everything (a collapsed training run) is refused: its
    probabilities cannot calibrate a label check."""
    model, x, y = problem
    with torch.no_grad():
        model.net[-1].weight.zero_()
        model.net[-1].bias.copy_(torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64))
    reference = (x, torch.where(torch.arange(40) < 20, 1, 2))  # the same logits for every point
    fi = ForwardInf(model, Classification(), MirrorConfig.preset("testing")).prepare((x, y))
    with pytest.raises(AttributionInputError, match="no better than their class frequencies alone"):
        fi.calibration(reference)


def test_the_curvature_sample_spans_a_set_sorted_by_label(problem):
    """curvature_samples < N: the estimate is the one over records spaced evenly across the set, not
    over its first records (a set sorted by label would lose its last classes)."""
    model, x, y = problem
    order = y.argsort(stable=True)
    x, y = x[order], y[order]
    config = MirrorConfig.preset("testing", precondition="hessian", damping=1e-3, curvature_samples=25)
    sampled = ForwardInf(model, Classification(), config).estimate_curvature((x, y))
    chosen = torch.arange(25) * 40 // 25
    assert chosen[-1] >= 38 and set(y[chosen].tolist()) == set(y.tolist())
    whole = ForwardInf(model, Classification(), config.replace(curvature_samples=40))
    explicit = whole.estimate_curvature((x[chosen], y[chosen]))
    assert sampled.samples == 25
    torch.testing.assert_close(sampled.raw, explicit.raw)


def test_lowrank_is_the_exact_hessian_where_its_basis_would_grow_past_a_quarter(problem):
    """83 parameters, damping 1e-6: no basis of under 21 vectors leaves only eigenvalues below 1e-7 out,
    so the whole matrix is decomposed and solved as the exact Hessian: the same solve (negative eigenvalues
    clipped in both), and the notes say why."""
    model, x, y = problem
    engines = [
        ForwardInf(model, Classification(), MirrorConfig.preset("testing", precondition=kind, damping=1e-6))
        for kind in ("hessian", "lowrank")
    ]
    exact, low = (engine.prepare((x, y)).curvature for engine in engines)
    assert low.kind == "hessian" and "the exact Hessian is used" in " ".join(engines[1].execution()["notes"])
    torch.manual_seed(1)
    grads = {n: torch.randn(3, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    assert len(low.factor) == 83 and low.left_out == 0 and low.clipped == exact.clipped > 0
    for n, v in low.solve(grads).items():
        torch.testing.assert_close(v, exact.solve(grads)[n], rtol=1e-6, atol=1e-8)


def _spectrum(values: torch.Tensor):
    """Products with U diag(values) U^T (U random orthogonal), counted, and that matrix."""
    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(len(values), len(values), dtype=torch.float64)).Q
    matrix, calls = (u * values) @ u.T, []

    def apply(v):
        calls.append(len(v))
        return v @ matrix

    return apply, matrix, calls


@pytest.mark.parametrize("signs", ["positive", "indefinite"])
def test_lowrank_is_nystrom_two_products_per_vector_at_the_best_rank_r_error(signs):
    """A decaying spectrum (10 x 0.9^i, every third eigenvalue negative in the indefinite case): the
    basis stops at 128 vectors (256 products, not Rayleigh-Ritz's 384), keeps 96 eigenpairs, and is as
    close to the matrix as any rank-96 matrix can be (the 97th eigenvalue in magnitude)."""
    size = 1200
    values = 10 * 0.9 ** torch.arange(size, dtype=torch.float64)
    if signs == "indefinite":
        values[::3] *= -1
    apply, matrix, calls = _spectrum(values)
    found, vectors, left_out, refused = top_eigen(apply, size, damping=1e-2, full=False)
    assert sum(calls) == 2 * 128 and len(found) == 96 and not refused and left_out <= LOWRANK_TOLERANCE * 1e-2
    error = torch.linalg.matrix_norm(matrix - (vectors.T * found) @ vectors, 2)
    assert error <= 1.001 * values.abs()[96]
    assert (found < 0).sum() == (values[:96] < 0).sum()


def test_lowrank_refuses_nystrom_where_an_indefinite_core_inflates_it():
    """A flat spectrum of +1 and -1: the Nystrom core Q H Q^T has near-zero eigenvalues from cancelling
    signs, and inverting them gives eigenvalues far past |H| = 1; the estimate is refused and
    Rayleigh-Ritz's (bounded by the spectrum) taken, and said."""
    size = 1200
    values = torch.ones(size, dtype=torch.float64)
    values[::2] = -1
    apply, matrix, _ = _spectrum(values)
    basis = torch.linalg.qr(apply(torch.randn(size, 64, dtype=torch.float64).T).T).Q.T
    assert _nystrom(basis, apply(basis))[0].abs().max() > 2  # the failure the guard is for
    found, _, _, refused = top_eigen(apply, size, damping=1e-2, full=False)
    assert refused and found.abs().max() <= 1 + 1e-9


def test_lowrank_leaves_out_only_curvature_well_below_the_damping():
    """A 771-parameter MLP (12 eigenvalues above the damping, 62 above a tenth of it): the low-rank solve
    keeps a fraction of the eigenpairs, and its preconditioned gradients are within LOWRANK_TOLERANCE of
    the exact Hessian's (a left-out eigenvalue l below tolerance x damping gets 1 / d for 1 / (l + d));
    the execution says the rank and what was left out."""
    torch.manual_seed(0)
    x = torch.randn(300, 20)
    y = x[:, :3].argmax(1)
    model = train_classifier(build("mlp", {"in_features": 20, "hidden": [32], "out_features": 3}), x, y, epochs=100)
    model, x = model.double(), x.double()
    engines = {
        kind: ForwardInf(
            model, Classification(), MirrorConfig.preset("testing", precondition=kind, damping=0.05)
        ).prepare((x, y))
        for kind in ("hessian", "lowrank")
    }
    low = engines["lowrank"].curvature
    assert len(low.factor) <= 771 // 4 and 0 < low.left_out <= LOWRANK_TOLERANCE * 0.05
    grads = {n: torch.randn(5, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    flat = [torch.cat([v.flatten(1) for v in engines[k].curvature.solve(grads).values()], 1) for k in engines]
    assert ((flat[1] - flat[0]).norm(dim=1) / flat[0].norm(dim=1)).max() <= LOWRANK_TOLERANCE
    ran = engines["lowrank"].execution()
    assert ran["curvature"]["rank"] == len(low.factor)
    assert any(f"top {len(low.factor)} of 771 eigenpairs" in note for note in ran["notes"])


class Scaled(torch.nn.Module):
    """`net` with its output multiplied by 1 after its last layer: the same function, but the model no
    longer returns that layer's output as it is."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 1.0


@pytest.mark.parametrize("mode", ["linear", "finite"])
@pytest.mark.parametrize("precondition", ["lowrank", "ekfac", "none"])
def test_a_perturbed_last_layer_runs_alone_on_its_inputs_with_the_same_scores(mode, precondition):
    """Only the head perturbed: the sweep and the curvature run the head on each training point's
    input to it (computed once) and give the whole model's scores; a model that changes the head's
    output after it is swept whole."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    ).double()
    x, y = torch.randn(30, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (30,))
    config = MirrorConfig.preset("testing", mode=mode, precondition=precondition, damping=0.1, lr=1e-3)
    fi = ForwardInf(net, Classification(), config.replace(params=("3.*",))).prepare((x, y))
    whole = ForwardInf(Scaled(net), Classification(), config.replace(params=("net.3.*",))).prepare((x, y))
    assert fi.tail is not None and whole.tail is None and fi.tail_inputs.inputs.shape == (30, 4 * 6 * 6)
    assert any("the sweep runs '3' alone" in note for note in fi.execution()["notes"])
    expected = whole.scores((x[:4], y[:4]))
    torch.testing.assert_close(fi.scores((x[:4], y[:4])), expected, rtol=1e-9, atol=1e-12)
    if mode == "linear":  # a linear head: its output gradients are kept too, and its sweep is products alone
        assert fi.tail_inputs.grads.shape == (30, 3)
        kept = ForwardInf(net, Classification(), config.replace(params=("3.*",), stacking="layers")).prepare((x, y))
        seen = []
        net[3].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
        torch.testing.assert_close(kept.scores((x[:4], y[:4])), expected, rtol=1e-9, atol=1e-12)
        assert kept.execution()["stacking"] == "layers" and 30 not in seen  # no forward over the training set


def test_a_last_layer_alone_still_refuses_data_the_model_cannot_take():
    """The pass that caches the last layer's inputs is also the check that model and data fit: a clear
    refusal (and NaN inputs refused), not a raw torch error."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    config = MirrorConfig(params=("3.*",), precondition="none")
    with pytest.raises(AttributionInputError, match="cannot process the training set"):
        ForwardInf(net, Classification(), config).prepare((torch.rand(10, 32), torch.randint(0, 3, (10,))))
    x = torch.rand(10, 64)
    x[3, 1] = float("nan")
    with pytest.raises(AttributionInputError, match="NaN"):
        ForwardInf(net, Classification(), config).prepare((x, torch.randint(0, 3, (10,))))


def test_hessian_preconditioning_refuses_a_model_too_large():
    model = build("mlp", {"in_features": 64, "hidden": [512], "out_features": 10})
    x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
    with pytest.raises(AttributionInputError, match="select fewer with `params`"):
        attribute(model, Classification(), (x, y), (x[:1], y[:1]), MirrorConfig(precondition="hessian"))
    # the last layer alone is small enough
    scores = attribute(
        model, Classification(), (x, y), (x[:1], y[:1]), MirrorConfig(precondition="hessian", params=("net.3.*",))
    )
    assert scores.shape == (1, 8) and torch.isfinite(scores).all()


def test_auto_precondition_prices_the_hessian(problem):
    """precondition="auto" takes the (low-rank) Hessian where building it is cheap, else the last layer's,
    else EK-FAC."""
    model, x, y = problem
    fi = ForwardInf(model, Classification(), MirrorConfig()).plan((x, y))
    assert fi.precondition == "lowrank" and list(fi.fm.theta) == [n for n, _ in model.named_parameters()]
    assert fi.exact_fallback  # 83 parameters: the exact Hessian is affordable too

    # 9,610 parameters over 1,437 points: the exact Hessian (~2.6e11 FLOPs) is over budget, a basis of
    # at most LOWRANK_MAX_RANK vectors (~8e10) is not
    wide = build("mlp", {"in_features": 64, "hidden": [128], "out_features": 10})
    fi = ForwardInf(wide, Classification(), MirrorConfig()).plan((torch.rand(1437, 64), torch.randint(0, 10, (1437,))))
    assert fi.precondition == "lowrank" and len(fi.fm.theta) == 4 and fi.exact_fallback is False

    # 2.7k parameters, but 2 MFLOP per 20x20 image: the full Hessian over 200 images is ~1e12 FLOPs;
    # the 170-parameter head alone ~6e6
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    )
    images, labels = torch.rand(200, 1, 20, 20), torch.randint(0, 10, (200,))
    fi = ForwardInf(cnn, Classification(), MirrorConfig()).plan((images, labels))
    assert fi.precondition == "lowrank" and list(fi.fm.theta) == ["6.weight", "6.bias"]
    few = ForwardInf(cnn, Classification(), MirrorConfig(curvature_samples=8)).plan((images, labels))
    assert few.precondition == "lowrank" and len(few.fm.theta) == len(list(cnn.parameters()))
    chosen = ForwardInf(cnn, Classification(), MirrorConfig(params=("0.*", "2.*"))).plan((images, labels))
    # the caller chose the parameters: no fallback to the head, but EK-FAC over the chosen layers, said
    assert chosen.precondition == "ekfac" and sorted(chosen.fm.theta) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert any("EK-FAC" in note for note in chosen.notes)


@pytest.mark.parametrize("group", [False, True])
def test_cosine_score_is_the_gradient_cosine_over_last_layer_norms(problem, group):
    """score="cosine": unit test gradients (their mean in group mode) dotted with each training
    gradient, over that training point's exact last-layer gradient norm (read off one forward pass)."""
    model, x, y = problem
    grads = per_sample_grads(model, x, y)  # (40, P); the last layer's weight and bias are the last 27 entries
    unit = grads[:5] / grads[:5].norm(dim=1, keepdim=True)
    query = unit.mean(0, keepdim=True) if group else unit
    config = MirrorConfig.preset("testing", lr=0.01, score="cosine", group=group)
    scores = attribute(model, Classification(), (x, y), (x[:5], y[:5]), config)
    expected = 0.01 * (query @ grads.T) / grads[:, -27:].norm(dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-12)


def test_cosine_score_refuses_what_it_cannot_compute(problem):
    model, x, y = problem
    with pytest.raises(AttributionInputError, match="mode='linear'"):
        MirrorConfig(score="cosine", mode="finite")
    conv_last = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten())  # 3 "classes" from a 3x3 image
    images = torch.rand(6, 1, 3, 3)
    with pytest.raises(AttributionInputError, match="torch.nn.Linear, not Conv2d"):
        attribute(conv_last, Classification(), (images, y[:6]), (images[:1], y[:1]), MirrorConfig(score="cosine"))


def test_cosine_norms_of_a_language_model_sum_over_positions():
    """For a sequence model the last layer's gradient sums over positions: the forward-pass norms
    equal the norms of explicit per-sequence gradients of the head."""
    torch.manual_seed(0)
    model = build("gpt", {"vocab_size": 11, "block_size": 8, "d_model": 16, "n_layer": 1, "n_head": 2}).double()
    tokens = torch.randint(0, 11, (6, 8))
    fi = ForwardInf(model, CausalLM(), MirrorConfig.preset("testing", score="cosine")).prepare(tokens)
    expected = []
    for row in tokens:
        model.zero_grad()
        CausalLM().loss(model, CausalLM().prepare({"inputs": row[None]})).sum().backward()
        expected.append(model.head.weight.grad.norm())
    torch.testing.assert_close(fi.norms, torch.stack(expected), rtol=1e-8, atol=0)


# -- Kronecker-factored curvature ------------------------------------------------------------------------
def layer_factors(model, x, y):
    """Per nn.Linear layer, explicitly: its inputs with a 1 appended (N, in+1), and its per-example
    gradients [grad W | grad b] (N, out, in+1) by a plain autograd loop (grad b is the output gradient)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.__setitem__(m, a[0].detach())) for m in layers]
    model(x)
    for h in hooks:
        h.remove()
    grads = {m: [] for m in layers}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for m in layers:
            grads[m].append(torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1).clone())
    ones = torch.ones(len(x), 1, dtype=x.dtype)
    return [(torch.cat([inputs[m], ones], 1), torch.stack(grads[m])) for m in layers]


def explicit_curvature(a, v, kind, damping):
    """The damped K-FAC or EK-FAC matrix of one layer, on row-major vec([W | b])."""
    big_a, big_g = a.T @ a / len(a), torch.einsum("no,np->op", v[:, :, -1], v[:, :, -1]) / len(a)
    if kind == "kfac":
        return torch.kron(big_g, big_a) + damping * torch.eye(big_g.shape[0] * big_a.shape[0], dtype=a.dtype)
    la, qa = torch.linalg.eigh(big_a)
    lg, qg = torch.linalg.eigh(big_g)
    values = (qg.T @ v @ qa).pow(2).mean(0)  # E[(Q_G^T V_n Q_A)^2]
    basis = torch.kron(qg, qa)
    return basis @ torch.diag(values.flatten()) @ basis.T + damping * torch.eye(len(basis), dtype=a.dtype)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_solves_equal_the_explicit_matrices(problem, kind):
    model, x, y = problem
    params = ("net.3.*",) if kind == "kfac" else ("*",)  # kfac on the single last layer; ekfac on both
    config = MirrorConfig.preset("testing", precondition=kind, damping=0.05, params=params)
    fi = ForwardInf(model, Classification(), config).prepare((x, y))
    layers = layer_factors(model, x, y)[-1:] if kind == "kfac" else layer_factors(model, x, y)
    names = [n for n, _ in model.named_parameters() if n.startswith("net.3") or kind == "ekfac"]
    torch.manual_seed(1)
    grads = {n: torch.randn(2, *dict(model.named_parameters())[n].shape, dtype=torch.float64) for n in names}
    solved = fi.curvature.solve(grads)
    for (a, v), weight, bias in zip(layers, names[::2], names[1::2], strict=True):
        stacked = torch.cat([grads[weight], grads[bias][..., None]], dim=2).flatten(1)  # (2, out*(in+1))
        expected = torch.linalg.solve(explicit_curvature(a, v, kind, 0.05), stacked.T).T
        got = torch.cat([solved[weight], solved[bias][..., None]], dim=2).flatten(1)
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_linear_scores_along_an_ekfac_step_are_its_influence_scores(problem):
    model, x, y = problem
    layers = layer_factors(model, x, y)
    config = MirrorConfig.preset("testing", precondition="ekfac", damping=0.05, lr=0.01)
    scores = attribute(model, Classification(), (x, y), (x[:4], y[:4]), config)
    flat = torch.cat([v.flatten(1) for _, v in layers], dim=1)  # (N, P): per-example gradients, vec([W | b])
    curvature = torch.block_diag(*[explicit_curvature(a, v, "ekfac", 0.05) for a, v in layers])
    expected = 0.01 * flat @ torch.linalg.solve(curvature, flat[:4].T)  # g_i . H_ekfac^-1 g_j
    torch.testing.assert_close(scores, expected.T, rtol=1e-6, atol=1e-12)


def test_kronecker_curvature_perturbs_only_factored_layers_and_says_so():
    torch.manual_seed(0)
    model = build("gpt", {"vocab_size": 11, "block_size": 8, "d_model": 16, "n_layer": 1, "n_head": 2}).double()
    tokens = torch.randint(0, 11, (12, 8))
    fi = ForwardInf(model, CausalLM(), MirrorConfig.preset("testing", precondition="ekfac", damping=0.1))
    scores = fi.prepare(tokens).scores(tokens[:2])
    assert scores.shape == (2, 12) and torch.isfinite(scores).all()
    perturbed = list(fi.fm.theta)
    assert perturbed and all(n.endswith(("weight", "bias")) for n in perturbed)
    assert "tok.weight" not in perturbed and "ln.weight" not in perturbed and "head.weight" in perturbed
    assert any("have no Kronecker factors" in note for note in fi.execution()["notes"])
    assert fi.execution()["curvature"]["kind"] == "ekfac"


def test_ekfac_on_a_convolution_equals_the_explicit_matrix():
    """A conv layer's factors come from its unfolded input patches; the per-example weight gradients
    here come from plain autograd, so a mismatch of patch and weight layouts would show."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1, stride=2), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 9, 4)
    ).double()
    x, y = torch.randn(30, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (30,))
    config = MirrorConfig.preset("testing", precondition="ekfac", damping=0.05, params=("0.*",))
    fi = ForwardInf(model, Classification(), config).prepare((x, y))
    conv = model[0]
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # (N, positions, 2*3*3)
    patches = torch.cat([patches, torch.ones_like(patches[..., :1])], dim=-1)
    outputs, rows = [], []
    for i in range(len(x)):
        out = conv(x[i : i + 1])
        out.retain_grad()
        model.zero_grad()
        F.cross_entropy(model[1:](out), y[i : i + 1]).backward()
        outputs.append(out.grad.flatten(2)[0].T)  # (positions, 3)
        rows.append(torch.cat([conv.weight.grad.flatten(1), conv.bias.grad[:, None]], dim=1).clone())
    g, v = torch.stack(outputs), torch.stack(rows)  # (N, positions, 3), (N, 3, 19)
    big_a = torch.einsum("npi,npj->ij", patches, patches) / (len(x) * patches.shape[1])
    big_g = torch.einsum("npo,npq->oq", g, g) / len(x)
    qa, qg = torch.linalg.eigh(big_a)[1], torch.linalg.eigh(big_g)[1]
    values = (qg.T @ v @ qa).pow(2).mean(0)
    basis = torch.kron(qg, qa)
    explicit = basis @ torch.diag(values.flatten()) @ basis.T + 0.05 * torch.eye(len(basis), dtype=x.dtype)
    grads = {"0.weight": torch.randn(2, 3, 2, 3, 3, dtype=x.dtype), "0.bias": torch.randn(2, 3, dtype=x.dtype)}
    solved = fi.curvature.solve(grads)
    stacked = torch.cat([grads["0.weight"].flatten(2), grads["0.bias"][..., None]], dim=2).flatten(1)
    got = torch.cat([solved["0.weight"].flatten(2), solved["0.bias"][..., None]], dim=2).flatten(1)
    torch.testing.assert_close(got, torch.linalg.solve(explicit, stacked.T).T, rtol=1e-7, atol=1e-10)


def test_auto_takes_ekfac_where_the_hessian_is_indefinite_past_the_damping():
    """A digits MLP stopped after 20 epochs has Hessian eigenvalues below -damping: "auto" finds one as
    the low-rank basis grows and takes EK-FAC instead (the same scores as asking for it), and says so; the
    same MLP trained to the end keeps its low-rank Hessian, and so does a damping the caller set (the
    scale is then theirs: the negative eigenvalues are clipped, and said). An engine given that stored
    EK-FAC (another worker of the fleet: `use`) switches as well and does not estimate again."""
    x, y, _, _ = digits()
    early, trained = digits_mlp(x, y, hidden=16, epochs=20), digits_mlp(x, y, hidden=16)
    exact = {
        name: ForwardInf(m, Classification(), MirrorConfig(precondition="hessian")).prepare((x, y)).curvature.raw
        for name, m in (("early", early), ("trained", trained))
    }
    assert float(torch.linalg.eigvalsh(exact["early"])[0]) < -1e-2 < float(torch.linalg.eigvalsh(exact["trained"])[0])
    assert ForwardInf(trained, Classification(), MirrorConfig()).prepare((x, y)).precondition == "lowrank"

    fi = ForwardInf(early, Classification(), MirrorConfig()).prepare((x, y))
    ran = fi.execution()
    assert fi.precondition == "ekfac" and ran["curvature"]["kind"] == "ekfac"
    assert any("negative curvature past the damping" in note for note in ran["notes"])
    given = ForwardInf(early, Classification(), MirrorConfig(damping=1e-2)).prepare((x, y))
    assert given.precondition == "lowrank" and given.execution()["curvature"]["clipped_eigenvalues"] > 0  # as asked
    asked = ForwardInf(early, Classification(), MirrorConfig(precondition="ekfac")).prepare((x, y))
    test = (x[:5], y[:5])
    torch.testing.assert_close(fi.scores(test), asked.scores(test))

    other = ForwardInf(early, Classification(), MirrorConfig()).plan((x, y))
    assert other.precondition == "lowrank"
    other.use(fi.curvature)
    other.prepare((x, y))
    assert other.precondition == "ekfac" and other.curvature is fi.curvature
    torch.testing.assert_close(other.scores(test), fi.scores(test))


@pytest.mark.parametrize("lowest", [-0.006, -0.02])
def test_lowrank_under_auto_stops_only_where_negative_curvature_past_the_damping_is_proven(lowest):
    """A spectrum of 40 decaying eigenvalues, 5 at `lowest` and the rest within +-0.004, damping 1e-2:
    Nystrom's estimate overshoots the negative ones past -damping in both cases, but only -0.02 is
    proven (H projected on the span of those eigenvectors) and stops the basis (curvature.Indefinite,
    which "auto" turns into EK-FAC)."""
    size = 1200
    values = torch.cat(
        [
            5 * 0.8 ** torch.arange(40, dtype=torch.float64),
            torch.full((5,), lowest, dtype=torch.float64),
            torch.linspace(-0.004, 0.004, size - 45, dtype=torch.float64),
        ]
    )
    apply, _, _ = _spectrum(values)
    basis = torch.linalg.qr(apply(torch.randn(size, 64, dtype=torch.float64).T).T).Q.T
    assert float(_nystrom(basis, apply(basis))[0].min()) < -1e-2  # what the proof is for
    if lowest > -1e-2:
        found, _, _, _ = top_eigen(apply, size, damping=1e-2, full=False, definite=True)
        assert float(found.min()) >= lowest - 1e-2  # the estimate kept, negatives and all (clipped later)
    else:
        with pytest.raises(Indefinite):
            top_eigen(apply, size, damping=1e-2, full=False, definite=True)
