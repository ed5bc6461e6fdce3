"""Sophia-H and Sophia-G: estimators against dense references, the clipped update by hand, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder as so
from secondorder.optim import SophiaG, SophiaH
from tests.cases import data, mlp, names
from tests.optim.checks import assert_accumulation_equals_full_batch, assert_resumes_bitwise, refresh_context
from tests.references import dense_ggn, dense_hessian

A_DIAG = torch.tensor([1.0, 4.0, 0.25, -0.5], dtype=torch.float64)  # one negative-curvature coordinate


def test_sophia_h_update_written_by_hand():
    """f = 1/2 sum a_i w_i^2: u * Hu = a u^2 with the optimizer's own Gaussian u, replayed here."""
    w = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = SophiaH([w], lr=0.05, rho=0.5, curvature_every=3, weight_decay=0.1, seed=7)
    gen = torch.Generator().manual_seed(7)
    ref, m, h = torch.ones(4, dtype=torch.float64), 0.0, torch.zeros(4, dtype=torch.float64)
    fractions = []
    for t in range(1, 11):
        opt.step(lambda: 0.5 * (A_DIAG * w * w).sum())
        g = A_DIAG * ref
        m = 0.965 * m + 0.035 * g
        if (t - 1) % 3 == 0:
            u = torch.randn(1, 4, generator=gen, dtype=torch.float64)[0]
            h = 0.99 * h + 0.01 * (u * A_DIAG * u)
        ratio = m / (0.5 * h).clamp_min(1e-12)
        ref = ref * (1 - 0.05 * 0.1) - 0.05 * ratio.clamp(-1, 1)
        fractions.append(float((ratio.abs() >= 1).double().mean()))
        assert torch.allclose(w.detach(), ref, rtol=0, atol=1e-14)
        assert opt.clip_fraction == fractions[-1]
    assert opt.num_curvature_steps == 4  # steps 1, 4, 7, 10
    assert abs(w[3].item()) <= 1 + 10 * 0.05  # the negative-curvature coordinate moves at most lr per step


def test_sophia_h_estimate_is_unbiased_for_the_hessian_diagonal():
    model = mlp()
    X, y = data("mlp", "ce")
    H = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    params = list(model.parameters())
    estimator, ctx = SophiaH(params, seed=3).estimator, refresh_context(seed=3)
    n = 3000
    total = 0
    for _ in range(n):
        est = estimator.estimate(F.cross_entropy(model(X), y), params, ctx).curvature
        total = total + torch.cat([e.reshape(-1) for e in est])
    # Gaussian u: Var(u_i (Hu)_i) = 2 H_ii^2 + sum_{j != i} H_ij^2 <= 2 ||H_i,:||^2; 5 standard errors
    sem = (2 * (H**2).sum(1)).sqrt() / math.sqrt(n)
    assert ((total / n - H.diag()).abs() <= 5 * sem + 1e-12).all()


def test_sophia_g_estimate_is_unbiased_for_the_gauss_newton_diagonal():
    model = mlp()
    X, y = data("mlp", "ce")
    G = dense_ggn(model, F.cross_entropy, [(X, y)], names(model))
    assert (so.GGNOperator(model, F.cross_entropy, (X, y)).to_dense() - G).abs().max() < 1e-12
    params = list(model.parameters())
    estimator, ctx = SophiaG(params, seed=4).estimator, refresh_context(seed=4)
    n = 3000
    samples = []
    for _ in range(n):
        logits = model(X)
        estimate = estimator.estimate((F.cross_entropy(logits, y), logits), params, ctx)
        est = estimator.combine(estimate.curvature, estimate.weight)
        samples.append(torch.cat([e.reshape(-1) for e in est]))
    S = torch.stack(samples)
    sem = S.std(0) / math.sqrt(n)
    assert ((S.mean(0) - G.diag()).abs() <= 5 * sem + 1e-12).all()  # E[B g_hat^2] = diag(GN) exactly


def test_sophia_g_trains_and_reports_clipping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X, y = data("mlp", "ce", n=64)
    opt = SophiaG(model.parameters(), lr=0.05, rho=0.05, curvature_every=5, weight_decay=0.0)
    rng = torch.get_rng_state()

    def closure():
        logits = model(X)
        return F.cross_entropy(logits, y), logits

    losses = [opt.step(closure).item() for _ in range(60)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert losses[-1] < 0.7 * losses[0]
    assert 0.0 <= opt.clip_fraction <= 1.0


def test_state_dict_resumes_bitwise():
    assert_resumes_bitwise(lambda params, seed: SophiaH(params, lr=0.01, curvature_every=2, seed=seed))


@pytest.mark.parametrize("cls", [SophiaH, SophiaG])
@pytest.mark.parametrize("kwargs, match", [({"lr": -1.0}, "lr"), ({"rho": 0.0}, "rho"), ({"curvature_every": 0}, "curvature_every"),
                                           ({"betas": (1.0, 0.9)}, "betas")])
def test_invalid_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(nn.Linear(2, 2).parameters(), **kwargs)


def test_sophia_g_needs_logits():
    model = mlp()
    X, y = data("mlp", "ce")
    opt = SophiaG(model.parameters())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="\\(loss, logits\\)"):
        opt.step(lambda: F.cross_entropy(model(X), y))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sophia_h_gradient_accumulation_equals_the_full_batch():
    assert_accumulation_equals_full_batch(lambda params: SophiaH(params, lr=0.01, rho=0.05, curvature_every=2, seed=2))


def test_sophia_g_accumulation_equals_the_full_batch():
    """B * g_hat^2 with g_hat averaged over micro-batches and B their total positions; labels are
    sampled by inverse CDF, one uniform per position, so micro-batches draw the full batch's labels."""
    X, y = data("mlp", "ce", n=16)
    full, micro = mlp(), mlp()
    # a large rho keeps |m| / (rho h) below 1 for many coordinates, so h shapes the steps
    opt_full = SophiaG(full.parameters(), lr=0.01, rho=100.0, curvature_every=2)
    opt_micro = SophiaG(micro.parameters(), lr=0.01, rho=100.0, curvature_every=2)

    def closure(model, rows):
        def evaluate():
            logits = model(X[rows])
            return F.cross_entropy(logits, y[rows]), logits

        return evaluate

    for _ in range(5):
        opt_full.step(closure(full, slice(None)))
        opt_micro.step([closure(micro, slice(0, 8)), closure(micro, slice(8, 16))])
    for p, q in zip(full.parameters(), micro.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    assert opt_micro.clip_fraction < 0.9
