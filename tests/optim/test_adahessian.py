"""AdaHessian against closed-form runs, dense Hessians and its own invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.optim import AdaHessian, HutchinsonRademacher, spatial_average
from tests.cases import data, mlp, names
from tests.optim.checks import assert_accumulation_equals_full_batch, assert_resumes_bitwise, refresh_context
from tests.references import dense_hessian

A_DIAG = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)


def quadratic_run(steps: int, **kwargs) -> tuple[torch.Tensor, AdaHessian]:
    """f = 1/2 sum a_i w_i^2 from w = 1: Hz = a * z, so |z * Hz| = a exactly for every probe."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdaHessian([w], **kwargs)
    for _ in range(steps):
        opt.step(lambda: 0.5 * (A_DIAG * w * w).sum())
    return w.detach(), opt


def reference_quadratic(steps: int, lr: float, k: float, beta1=0.9, beta2=0.999, eps=1e-4) -> torch.Tensor:
    """The published update written out by hand for the quadratic (D = a at every step)."""
    w, m, v = torch.ones(3, dtype=torch.float64), 0.0, 0.0
    for t in range(1, steps + 1):
        g = A_DIAG * w
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * A_DIAG**2
        denom = (torch.sqrt(v) / math.sqrt(1 - beta2**t)) ** k + eps
        w = w - lr * (m / (1 - beta1**t)) / denom
    return w


def test_closed_form_values_from_the_notes():
    w1, _ = quadratic_run(1, lr=0.1)
    w3, _ = quadratic_run(3, lr=0.1)
    assert w1[0].item() == pytest.approx(0.90001, abs=1e-6)
    assert w3[0].item() == pytest.approx(0.715797, abs=1e-6)
    w3_half, _ = quadratic_run(3, lr=0.1, hessian_power=0.5)
    assert w3_half.tolist() == pytest.approx([0.715797, 0.462327, 0.853995], abs=1e-6)


@pytest.mark.parametrize("k", [0.0, 0.5, 1.0])
def test_matches_the_update_written_by_hand(k):
    w, _ = quadratic_run(25, lr=0.05, hessian_power=k)
    assert torch.allclose(w, reference_quadratic(25, 0.05, k), rtol=0, atol=1e-13)


def test_delayed_curvature_keeps_the_steady_state_denominator():
    """With update_each = 5 the bias correction counts curvature refreshes, so the denominator
    sqrt(v / (1 - beta2^s)) equals the every-step one when the curvature is constant."""
    _, every = quadratic_run(23, lr=0.01)
    _, delayed = quadratic_run(23, lr=0.01, curvature_every=5)
    assert delayed.num_curvature_steps == 5 and every.num_curvature_steps == 23  # steps 1, 6, 11, 16, 21

    def denominator(opt):
        v = next(iter(opt.state.values()))["exp_hessian_diag_sq"]
        return v.sqrt() / math.sqrt(1 - 0.999**opt.num_curvature_steps)

    assert torch.allclose(denominator(delayed), A_DIAG, rtol=1e-12, atol=0)
    assert torch.allclose(denominator(every), A_DIAG, rtol=1e-12, atol=0)
    # counting the step instead (pytorch-optimizer's update_period) would under-estimate it about 1/sqrt(5)
    v = next(iter(delayed.state.values()))["exp_hessian_diag_sq"]
    assert (v.sqrt() / math.sqrt(1 - 0.999**23) / A_DIAG).max() < 0.5


def test_only_curvature_steps_differentiate_twice(monkeypatch):
    import secondorder.optim.estimators as module

    calls = []
    original = module.hessian_product
    monkeypatch.setattr(module, "hessian_product", lambda *a, **k: calls.append(1) or original(*a, **k))
    quadratic_run(7, lr=0.01, curvature_every=3)
    assert len(calls) == 3  # steps 1, 4, 7


def test_diagonal_estimator_is_unbiased_for_the_hessian_diagonal():
    model = mlp()
    X, y = data("mlp", "ce")
    H = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    estimator = HutchinsonRademacher(num_probes=4000, absolute=False)  # AdaHessian(estimator="diagonal")
    ctx = refresh_context(seed=1)
    raw = estimator.estimate(F.cross_entropy(model(X), y), list(model.parameters()), ctx).curvature
    estimates = estimator.combine(raw, None)
    est = torch.cat([e.reshape(-1) for e in estimates])
    # entry variance sum_{j != i} H_ij^2 / n: allow 5 standard errors per entry
    sem = ((H**2).sum(1) - H.diag() ** 2).clamp_min(0).sqrt() / math.sqrt(4000)
    assert ((est - H.diag()).abs() <= 5 * sem + 1e-12).all()


def test_official_estimator_tracks_row_norms():
    """|z * Hz| = |Hz|, whose mean square is (H^2)_ii = ||H_i,:||^2: the official denominator."""
    model = mlp()
    X, y = data("mlp", "ce")
    H = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    params = list(model.parameters())
    estimator = AdaHessian(params, num_probes=1, seed=2).estimator
    ctx = refresh_context(seed=2)
    squares = 0
    n = 2000
    for _ in range(n):
        est = estimator.combine(estimator.estimate(F.cross_entropy(model(X), y), params, ctx).curvature, None)
        squares = squares + torch.cat([e.reshape(-1) for e in est]) ** 2
    rms = (squares / n).sqrt()
    row_norms = H.norm(dim=1)
    assert torch.allclose(rms, row_norms, rtol=0.1, atol=1e-8)  # a 2000-sample RMS: a few percent


def test_spatial_averaging_semantics():
    d1 = torch.arange(4.0)
    assert torch.equal(spatial_average(d1, 2), d1)  # 1-D: never averaged
    d2 = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(spatial_average(d2, None), d2)
    expected = torch.tensor([[1.0, 1, 1, 4, 4, 4], [7, 7, 7, 10, 10, 10]])
    assert torch.equal(spatial_average(d2, 3), expected)
    for shape in [(4, 2, 3), (4, 2, 3, 3), (4, 2, 3, 3, 3)]:  # Conv1d, Conv2d, Conv3d kernels
        d = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        out = spatial_average(d, None)
        means = d.reshape(4, 2, -1).mean(-1)
        assert torch.allclose(out.reshape(4, 2, -1), means[..., None].expand(4, 2, out[0, 0].numel()))


def test_conv3d_linear_and_unused_parameters_train():
    """Conv3d kernels (which crash the official code), a linearly used and an unused parameter."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 2)
            self.head = nn.Linear(2, 1)
            self.shift = nn.Parameter(torch.tensor(0.5))
            self.unused = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.head(self.conv(x).mean(dim=(2, 3, 4))).squeeze(1) + self.shift

    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(8, 1, 3, 3, 3), torch.randn(8)
    opt = AdaHessian(net.parameters(), lr=0.01)
    rng = torch.get_rng_state()
    losses = [opt.step(lambda: F.mse_loss(net(x), y)).item() for _ in range(20)]
    assert torch.equal(torch.get_rng_state(), rng)  # probes come from the optimizer's own generator
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert torch.equal(net.unused, torch.ones(3)) and net.unused not in opt.state


def test_state_dict_resumes_bitwise():
    assert_resumes_bitwise(lambda params, seed: AdaHessian(params, lr=0.05, curvature_every=2, seed=seed))


def test_param_groups_and_weight_decay():
    w1 = nn.Parameter(torch.ones(3, dtype=torch.float64))
    w2 = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdaHessian([{"params": [w1], "lr": 0.1}, {"params": [w2], "lr": 0.0, "weight_decay": 0.0}])
    opt.step(lambda: 0.5 * (A_DIAG * (w1 * w1 + w2 * w2)).sum())
    assert torch.equal(w2, torch.ones(3, dtype=torch.float64)) and not torch.equal(w1, w2)
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    AdaHessian([w], lr=0.1, weight_decay=0.5).step(lambda: 0.0 * w.sum() + 0.5 * (A_DIAG * w * w).sum())
    w_plain, _ = quadratic_run(1, lr=0.1)
    assert torch.allclose(w, w_plain - 0.1 * 0.5 * 1.0, atol=1e-15)  # decoupled: lr * wd * w, w = 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"hessian_power": 1.5}, "hessian_power"),
        ({"curvature_every": 0}, "curvature_every"),
        ({"estimator": "gnb"}, "estimator"),
        ({"block_size": 4}, "does not divide"),
        ({"num_probes": 0}, "num_probes"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaHessian(nn.Linear(6, 2).parameters(), **kwargs)


def test_bad_closures_and_non_finite_loss_leave_parameters_untouched():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdaHessian([w])
    with pytest.raises(ValueError, match="step\\(closure\\)"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: w * 2)
    with pytest.raises(ValueError, match="no graph"):
        opt.step(lambda: torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="step 1"):
        opt.step(lambda: (w * float("nan")).sum())
    assert torch.equal(w, torch.ones(3, dtype=torch.float64)) and not opt.state and opt.num_steps == 0


@pytest.mark.parametrize("estimator", ["official", "diagonal"])
def test_gradient_accumulation_equals_the_full_batch(estimator):
    """The absolute value of the official estimator is taken after averaging over micro-batches."""
    assert_accumulation_equals_full_batch(
        lambda params: AdaHessian(params, lr=0.05, estimator=estimator, num_probes=2, curvature_every=2, seed=1)
    )


def test_official_estimator_takes_the_absolute_value_after_averaging():
    raw = [torch.tensor([[-2.0, 1.0], [1.0, 3.0]])]  # two probes' signed z * Hz
    official = AdaHessian([nn.Parameter(torch.zeros(2))]).estimator
    diagonal = AdaHessian([nn.Parameter(torch.zeros(2))], estimator="diagonal").estimator
    assert torch.equal(official.combine(raw, None)[0], torch.tensor([1.5, 2.0]))
    assert torch.equal(diagonal.combine(raw, None)[0], torch.tensor([-0.5, 2.0]))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_matches_torch_optimizer_adahessian_bitwise():
    """torch-optimizer's Adahessian (the official image-classification update) over 20 steps of a
    small CNN, k = 1, same probes (its global-RNG draws replayed by our generator's seed)."""
    torch_optimizer = pytest.importorskip("torch_optimizer")

    def cnn():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))

    X = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    ours_model, theirs_model = cnn(), cnn()
    ours = AdaHessian(ours_model.parameters(), lr=0.15, weight_decay=1e-3, seed=5)
    theirs = torch_optimizer.Adahessian(theirs_model.parameters(), lr=0.15, weight_decay=1e-3, hessian_power=1.0)

    def their_closure():
        theirs.zero_grad()
        loss = F.cross_entropy(theirs_model(X), y)
        loss.backward(create_graph=True)
        return loss

    with torch.random.fork_rng():
        torch.manual_seed(5)  # their probes come from the global RNG, ours from a generator seeded alike
        for _ in range(20):
            ours.step(lambda: F.cross_entropy(ours_model(X), y))
            theirs.step(their_closure)
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        assert torch.equal(p, q)
