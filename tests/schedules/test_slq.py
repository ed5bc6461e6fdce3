"""SLQLearningRate: the heavy-ball optimum and its rate on quadratics of known spectrum, the Cauchy step of
the gradient mode, the clamps, smoothing, driving SGD and Adam, a bitwise resume, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.schedules import SLQLearningRate, SLQRecord

DUMMY = (torch.zeros(1, 1), torch.zeros(1))  # the quadratic ignores its inputs; one "sample"


class Quadratic(nn.Module):
    """loss = 1/2 w^T A w - b^T w: its Hessian is A exactly (float64)."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        return 0.5 * self.w @ self.A @ self.w - self.b @ self.w


def value(outputs, targets):
    return outputs


def spectrum(P=12, mu=0.5, L=50.0):
    return torch.logspace(math.log10(mu), math.log10(L), P, dtype=torch.float64)


def quadratic(eigs, rotate=False, seed=0, zero_b=False):
    g = torch.Generator().manual_seed(seed)
    P = len(eigs)
    Q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))[0] if rotate else torch.eye(
        P, dtype=torch.float64)
    A = Q @ torch.diag(eigs) @ Q.T
    A = (A + A.T) / 2
    b = torch.zeros(P, dtype=torch.float64) if zero_b else torch.randn(P, generator=g, dtype=torch.float64)
    return Quadratic(A, b, torch.randn(P, generator=g, dtype=torch.float64))


def optimum(lmax, lmin):
    kappa = lmax / lmin
    return (2 / (math.sqrt(lmax) + math.sqrt(lmin))) ** 2, ((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2


@pytest.mark.parametrize("rotate, rule, quantile, low", [
    (False, "quantile", 0.05, 0),  # diagonal: every Gauss weight is exactly 1/12, the 5 % point is the smallest
    (False, "quantile", 0.2, 2),  # cumulative 1/12, 2/12, 3/12: the 20 % point is the third smallest
    (True, "ritz", 0.05, 0),  # rotated dense: the smallest positive Ritz value
])
def test_recovers_the_heavy_ball_optimum(rotate, rule, quantile, low):
    eigs = spectrum()
    model = quadratic(eigs, rotate)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    learner = SLQLearningRate(opt, model, value, every=5, num_steps=30, lambda_min=rule, quantile=quantile,
                              lr_cap="optimal")
    record = learner.step(DUMMY)
    lr, rho = optimum(float(eigs[-1]), float(eigs[low]))
    assert record.step == 0 and record.matvecs == 12  # Lanczos capped at the dimension: exact
    assert record.lambda_max == pytest.approx(float(eigs[-1]), rel=1e-12)
    assert record.lambda_min == pytest.approx(float(eigs[low]), rel=1e-12)
    assert record.kappa == pytest.approx(float(eigs[-1] / eigs[low]), rel=1e-12)
    assert record.lr == pytest.approx(lr, rel=1e-12) and record.momentum == pytest.approx(rho, rel=1e-12)
    assert opt.param_groups[0]["lr"] == record.lr and opt.param_groups[0]["momentum"] == record.momentum
    assert learner.step(DUMMY) is None and len(learner.records) == 1  # not due: no refresh
    safe = SLQLearningRate(opt, model, value, every=5, num_steps=30, lambda_min=rule, quantile=quantile).step(DUMMY)
    assert safe.lr == min(lr, 2 / record.lambda_max) and safe.momentum == record.momentum  # the default cap 2/L


def test_sgd_momentum_is_the_heavy_ball_and_converges_at_the_theoretical_rate():
    eigs = spectrum()  # kappa = 100
    model = quadratic(eigs, rotate=True, zero_b=True)  # w* = 0: the iterate is the error, at full precision
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    learner = SLQLearningRate(opt, model, value, every=10_000, num_steps=12, lr_cap="optimal")
    A, w = model.A, model.w.detach().clone()
    previous = w.clone()
    errors = []
    for t in range(600):
        learner.step(DUMMY)
        alpha, rho = learner.lr, learner.momentum
        opt.zero_grad()
        model(None).backward()
        opt.step()
        w, previous = w - alpha * (A @ w) + rho * (w - previous), w  # the classical heavy ball
        assert float((model.w.detach() - w).norm()) <= 1e-10 * float(w.norm()), t  # the same iterates, up to rounding
        errors.append(float(model.w.detach().norm()))
    # the extreme modes have double roots: error ~ t r^t, so divide out the factor t
    t1, t2 = 300, 600
    rate = (errors[t2 - 1] / errors[t1 - 1] * t1 / t2) ** (1 / (t2 - t1))
    kappa = float(eigs[-1] / eigs[0])
    assert rate == pytest.approx((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1), rel=1e-4)


def test_gradient_mode_is_the_cauchy_step():
    model = quadratic(spectrum(), rotate=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.3)
    learner = SLQLearningRate(opt, model, value, mode="gradient", every=1)
    record = learner.step(DUMMY)
    A, w = model.A, model.w.detach()
    g = A @ w - model.b
    assert record.lr == pytest.approx(float(g @ g / (g @ A @ g)), rel=1e-13)
    assert record.lambda_max == record.lambda_min == pytest.approx(float(g @ A @ g / (g @ g)), rel=1e-13)
    assert record.matvecs == 1 and record.momentum == 0 and record.kappa == 1
    assert opt.param_groups[0]["lr"] == record.lr and opt.param_groups[0]["momentum"] == 0.3  # momentum kept


def test_momentum_clamp_and_smoothing():
    eigs = spectrum(L=1e4, mu=1e-3)  # kappa 1e7 > kappa_max
    model = quadratic(eigs)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    learner = SLQLearningRate(opt, model, value, every=1, num_steps=12, max_momentum=0.9, smoothing=0.5,
                              lr_factor=0.5, lr_cap="optimal")
    first = learner.step(DUMMY)
    root = math.sqrt(0.9)
    assert first.kappa == pytest.approx(((1 + root) / (1 - root)) ** 2, rel=1e-12)
    assert first.momentum == pytest.approx(0.9, rel=1e-12)
    assert first.lr == pytest.approx(0.5 * (1 + root) ** 2 / 1e4, rel=1e-12)  # lr_factor times the cap
    with torch.no_grad():
        model.A.mul_(4.0)  # the spectrum moves up by 4: the smoothed edges by 2 (geometric EMA, 0.5)
    second = learner.step(DUMMY)
    assert second.lambda_max == pytest.approx(4e4, rel=1e-12)
    # the optimum of the smoothed top edge 2e4 (times 0.5), below the cap (1 + root)^2 / 4e4
    assert second.lr == pytest.approx(0.5 * (1 + root) ** 2 / 2e4, rel=1e-12) and second.momentum == first.momentum
    learner.lr_factor = 1.0
    with torch.no_grad():
        model.A.mul_(4.0)
    third = learner.step(DUMMY)  # smoothed top edge 2e4 * 4 = 8e4 (geometric), fresh 1.6e5: the cap binds
    assert third.lr == pytest.approx((1 + root) ** 2 / 1.6e5, rel=1e-12)


def test_adam_betas_and_the_untouched_mode_and_global_rng():
    model = quadratic(spectrum(), rotate=True)
    opt = torch.optim.Adam(model.parameters(), betas=(0.5, 0.999))
    learner = SLQLearningRate(opt, model, value, every=1, num_steps=12, lambda_min="ritz")
    model.train()
    state = torch.get_rng_state()
    record = learner.step(DUMMY)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert opt.param_groups[0]["betas"] == (record.momentum, 0.999) and opt.param_groups[0]["lr"] == record.lr
    model.eval()
    learner.step(DUMMY)
    assert not model.training


def mlp_run(steps, state=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    learner = SLQLearningRate(opt, net, F.cross_entropy, (x, y), every=3, num_steps=6, batch_size=20,
                              max_micro_batch=8, smoothing=0.5, seed=7)
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        learner.load_state_dict(state["learner"])
    for _ in range(steps):
        learner.step()
        torch.manual_seed(learner.steps)  # the training step's dropout mask, the same after a resume
        opt.zero_grad()
        F.cross_entropy(net(x[:16]), y[:16]).backward()
        opt.step()
    return net, opt, learner


def test_state_dict_resumes_bitwise():
    net, opt, learner = mlp_run(10)
    _, _, half = mlp_run(4)
    saved = {"model": half.model.state_dict(), "optimizer": half.optimizer.state_dict(),
             "learner": half.state_dict()}
    resumed_net, _, resumed = mlp_run(6, state=saved)
    assert resumed.records == learner.records and len(learner.records) == 4
    assert all(isinstance(r, SLQRecord) and r.matvecs == 6 for r in learner.records)
    assert [r.step for r in learner.records] == [0, 3, 6, 9]
    for a, b in zip(net.parameters(), resumed_net.parameters()):
        assert torch.equal(a, b)
    again = mlp_run(0)[2]
    again.load_state_dict(learner.state_dict())
    mine, theirs = again.state_dict(), learner.state_dict()
    assert torch.equal(mine.pop("generator"), theirs.pop("generator")) and mine == theirs


def test_refusals():
    model = quadratic(spectrum())
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    for kwargs, message in (({"every": 0}, "every"), ({"num_steps": 0}, "num_steps"), ({"mode": "x"}, "mode"),
                            ({"quantile": 1.0}, "quantile"), ({"max_momentum": 1.0}, "max_momentum"),
                            ({"lr_factor": 0.0}, "lr_factor"), ({"lambda_min": "median"}, "lambda_min"), ({"lr_cap": "none"}, "lr_cap"),
                            ({"smoothing": -0.1}, "smoothing"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ValueError, match=message):
            SLQLearningRate(sgd, model, value, **kwargs)
    with pytest.raises(ValueError, match="neither 'momentum'"):
        SLQLearningRate(torch.optim.Adagrad(model.parameters()), model, value)
    SLQLearningRate(torch.optim.Adagrad(model.parameters()), model, value, mode="gradient")  # lr only: fine
    with pytest.raises(ValueError, match="nesterov"):
        SLQLearningRate(torch.optim.SGD(model.parameters(), lr=1, momentum=0.5, nesterov=True), model, value)
    with pytest.raises(ValueError, match="dampening"):
        SLQLearningRate(torch.optim.SGD(model.parameters(), lr=1, momentum=0.5, dampening=0.1), model, value)
    with pytest.raises(ValueError, match="not parameters of the model"):
        SLQLearningRate(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1), model, value)
    with pytest.raises(TypeError, match="data must be"):
        SLQLearningRate(sgd, model, value, data=[torch.zeros(3)])
    with pytest.raises(ValueError, match="no batch was given"):
        SLQLearningRate(sgd, model, value).step()
    concave = quadratic(-spectrum())
    with pytest.raises(ValueError, match="no positive curvature"):
        SLQLearningRate(torch.optim.SGD(concave.parameters(), lr=1), concave, value, num_steps=12).step(DUMMY)
    learner = SLQLearningRate(sgd, model, value, every=1, num_steps=12)
    learner.step(DUMMY)
    other = SLQLearningRate(sgd, model, value, every=2, num_steps=12)
    with pytest.raises(ValueError, match="every=1"):
        other.load_state_dict(learner.state_dict())
    with torch.no_grad():
        model.A.neg_()  # no positive curvature any more: the previous values are kept
    kept = learner.step(DUMMY)
    assert kept.kept and math.isnan(kept.lambda_min) and kept.lr == learner.records[0].lr
