"""Stability checks: the bounds against real optimizer runs on quadratics, the preconditioned
sharpness against dense eigenvalues of P^{-1/2} H P^{-1/2}, the edge-of-stability tracker."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.analysis import HessianTracker, analyze
from secondorder.analysis.stability import (
    BoundCheck,
    ema_threshold,
    optimizer_preconditioner,
    plain_preconditioner,
    preconditioned_top,
    sgd_threshold,
    stability_check,
)
from secondorder.linalg import eigenvalues, trace
from secondorder.operators import HessianOperator
from secondorder.optim import AdaHessian, SophiaH
from tests.cases import tiny_problem
from tests.references import dense_hessian

SPECTRUM = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)


class Quadratic(nn.Module):
    """loss = 1/2 (w - 1)^T A (w - 1) with A = Q diag(SPECTRUM) Q^T (forward returns the loss)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
        self.register_buffer("A", Q @ torch.diag(SPECTRUM) @ Q.T)
        self.w = nn.Parameter(torch.zeros(5, dtype=torch.float64))

    def forward(self, x):
        d = self.w - 1
        return 0.5 * d @ self.A @ d + 0 * x.sum()


def _loss(out, _):
    return out


DATA = (torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def _distance_after(optimizer_factory, steps: int = 800) -> float:
    model = Quadratic()
    opt = optimizer_factory(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model(DATA[0]).backward()
        opt.step()
    return float((model.w.detach() - 1).norm())


def _verdict(model: nn.Module, pre) -> str:
    op = HessianOperator(model, _loss, DATA)
    return stability_check(eigenvalues(op, 1, seed=0), trace(op, 15, seed=0), pre).sharpness.verdict


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_diverges_exactly_past_its_bound_and_the_verdict_says_so(momentum, nesterov):
    edge = sgd_threshold(1.0, momentum, 0.0, nesterov) / float(SPECTRUM.max())  # lr at which lambda_max = bound
    for factor, verdict in ((1 - 2e-2, "stable"), (1 + 2e-2, "unstable")):
        lr = edge * factor

        def sgd(params, lr=lr):
            return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)

        distance = _distance_after(sgd)
        assert (distance < 1e-3) if verdict == "stable" else (distance > 10), (factor, distance)
        model = Quadratic()
        assert _verdict(model, optimizer_preconditioner(sgd(model.parameters()), [model.w])) == verdict


def test_ema_bound_is_where_frozen_preconditioner_momentum_diverges():
    """m <- b m + (1-b) g, w <- w - lr P^-1 m on the quadratic: the bound on lambda_max(P^-1 A)."""
    A = Quadratic().A
    P = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    lam = float(torch.linalg.eigvalsh(A / P.sqrt()[:, None] / P.sqrt()[None, :]).max())
    beta = 0.9
    for factor, converges in ((1 - 1e-3, True), (1 + 1e-3, False)):
        lr = ema_threshold(1.0, beta) / lam * factor
        w, m = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
        for _ in range(6000):
            m = beta * m + (1 - beta) * (A @ (w - 1))
            w = w - lr * m / P
        assert (float((w - 1).norm()) < 1e-3) == converges


def _adam_p(opt, p):
    s, (b1, b2), eps = opt.state[p], opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    t = float(s["step"])
    return (1 - b1**t) * ((s["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps)


def _adahessian_p(opt, p):
    s, g = opt.state[p], opt.param_groups[0]
    b1, b2 = g["betas"]
    return (1 - b1 ** s["step"]) * (s["exp_hessian_diag_sq"].sqrt() / (1 - b2 ** s["curvature_step"]) ** 0.5 + g["eps"])


def _sophia_p(opt, p):
    g = opt.param_groups[0]
    return (g["rho"] * opt.state[p]["hessian"]).clamp_min(g["eps"])


def _rmsprop_p(opt, p):
    return opt.state[p]["square_avg"].sqrt() + opt.param_groups[0]["eps"]


OPTIMIZERS = {
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.01), _adam_p, ema_threshold(0.01, 0.9)),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.99)), _adam_p, ema_threshold(0.01, 0.8)),
    "adahessian": (lambda ps: AdaHessian(ps, lr=0.05), _adahessian_p, ema_threshold(0.05, 0.9)),
    "sophia": (lambda ps: SophiaH(ps, lr=0.01, curvature_every=1), _sophia_p, ema_threshold(0.01, 0.965)),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5), _rmsprop_p, sgd_threshold(0.01, 0.5)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_preconditioned_sharpness_equals_the_dense_eigenvalue(name):
    make, p_of, threshold = OPTIMIZERS[name]
    model, data = tiny_problem()
    params = list(model.parameters())
    opt = make(params)
    def closure():
        return F.cross_entropy(model(data[0][0]), data[0][1])

    for _ in range(3):
        opt.zero_grad()
        if name in ("adahessian", "sophia"):  # they take their own gradients and products
            opt.step(closure)
        else:
            closure().backward()
            opt.step()
    pre = optimizer_preconditioner(opt, params)
    P = torch.cat([p_of(opt, p).flatten() for p in params]).double()
    assert pre.rule == ("adam" if name == "adamw" else name) and pre.threshold == pytest.approx(threshold, rel=1e-15)
    torch.testing.assert_close(pre.diagonal, P, rtol=1e-15, atol=0)
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, F.cross_entropy, data, names)
    want = float(torch.linalg.eigvalsh(H / P.sqrt()[:, None] / P.sqrt()[None, :]).max())
    top = preconditioned_top(HessianOperator(model, F.cross_entropy, data), pre, seed=0)
    assert abs(float(top.eigenvalues[0]) - want) <= float(top.residuals[0]) + 1e-9 * want
    assert float(top.residuals[0]) < 1e-6 * want
    # the state_dict reads the same preconditioner
    from_state = optimizer_preconditioner(opt.state_dict(), params, parameters=params)
    assert from_state.threshold == pre.threshold and torch.equal(from_state.diagonal, pre.diagonal)


def test_the_tracker_follows_gd_across_two_over_lr():
    """GD on 1/2 (ab - 3)^2 from (0.1, 0.2) at lr 0.5: the sharpness grows toward 6 > 2/lr = 4 at the
    balanced minimum, crossing the bound; every record equals the dense 2x2 Hessian's eigenvalue and
    the verdict flips exactly where it crosses."""

    class Product(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
            self.b = nn.Parameter(torch.tensor(0.2, dtype=torch.float64))

        def forward(self, x):
            return self.a * self.b * x

    def loss_fn(out, y):
        return 0.5 * ((out - y) ** 2).mean()

    data = (torch.ones(1, dtype=torch.float64), torch.full((1,), 3.0, dtype=torch.float64))
    model, lr = Product(), 0.5
    tracker = HessianTracker(loss_fn, data, lr=lr, trace_matvecs=6, every=2)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    exact = {}
    for step in range(40):
        assert (tracker(step, model) is None) == (step % 2 == 1)
        a, b = float(model.a.detach()), float(model.b.detach())
        exact[step] = float(torch.linalg.eigvalsh(torch.tensor([[b * b, 2 * a * b - 3], [2 * a * b - 3, a * a]],
                                                               dtype=torch.float64)).max())
        opt.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        opt.step()
    verdicts = []
    for point in tracker.points:
        check = point.stability.sharpness
        assert point.top_eigenvalue == pytest.approx(exact[point.step], rel=1e-10) and check.threshold == 4.0
        assert check.verdict == ("unstable" if exact[point.step] > 4.0 else "stable")
        verdicts.append(check.verdict)
    assert verdicts[0] == "stable" and "unstable" in verdicts  # it crosses


def test_tracker_reads_the_live_adaptive_state():
    model, data = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = HessianTracker(F.cross_entropy, data, optimizer=opt, trace_matvecs=6)
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(model(data[0][0]), data[0][1]).backward()
        opt.step()
        point = tracker(step, model)
        pre = optimizer_preconditioner(opt, list(model.parameters()))
        want = preconditioned_top(HessianOperator(model, F.cross_entropy, data), pre, seed=0)
        assert point.stability.preconditioned.value == float(want.eigenvalues[0])
        assert point.stability.trace is None and point.stability.verdict == point.stability.preconditioned.verdict


def test_analyze_reports_the_checks_and_round_trips(tmp_path):
    model, data = tiny_problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.zero_grad()
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    opt.step()
    before, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    kwargs = dict(top_k=1, bottom_k=0, trace_matvecs=9, slq_probes=1, slq_steps=5, landscape=False, seed=0)
    plain = analyze(model, F.cross_entropy, data, lr=0.3, momentum=0.5, **kwargs)
    s = plain.stability
    assert s.rule == "heavy-ball" and s.sharpness.threshold == pytest.approx(3.0 / 0.3)
    assert s.sharpness.value == float(plain.top.eigenvalues[0]) and s.preconditioned is None
    assert s.trace.threshold == pytest.approx(2 * 0.5 / 0.3) and (s.trace.low, s.trace.high) == \
        plain.trace.confidence_interval(0.95)
    adaptive = analyze(model, F.cross_entropy, data, optimizer=opt.state_dict(),
                       optimizer_parameters=list(model.parameters()), **kwargs)
    assert adaptive.stability.preconditioned.threshold == pytest.approx(38 / 0.01)
    for result in (plain, adaptive):
        result.save(tmp_path / "a.json")
        assert type(result).load(tmp_path / "a.json") == result
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, opt.state_dict()["state"][i][k]) for i, s in state["state"].items() for k, v in s.items())


def test_verdicts_follow_the_interval():
    assert BoundCheck.of("x", 1.0, 0.9, 1.1, 1.2).verdict == "stable"
    assert BoundCheck.of("x", 1.0, 0.9, 1.1, 0.8).verdict == "unstable"
    assert BoundCheck.of("x", 1.0, 0.9, 1.1, 1.0).verdict == "undecided"
    assert BoundCheck.of("x", 1.0, 0.9, 1.1, 2.0).ratio == 0.5


def test_refusals():
    model, data = tiny_problem()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="take at least one step"):
        opt = torch.optim.Adam(params[:2], lr=0.1)
        opt.zero_grad()
        F.cross_entropy(model(data[0][0]), data[0][1]).backward()
        opt.step()
        opt.add_param_group({"params": params[2:]})
        optimizer_preconditioner(opt, params)
    with pytest.raises(ValueError, match="not in the optimizer"):
        optimizer_preconditioner(torch.optim.SGD(params[:1], lr=0.1), params)
    with pytest.raises(ValueError, match="share one learning rate"):
        optimizer_preconditioner(torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 1.0}],
                                                 lr=0.1), params)
    with pytest.raises(ValueError, match="is not supported"):
        optimizer_preconditioner(torch.optim.Adamax(params, lr=0.1), params)
    with pytest.raises(ValueError, match="needs `parameters`"):
        optimizer_preconditioner(torch.optim.SGD(params, lr=0.1).state_dict(), params)
    with pytest.raises(ValueError, match="not both"):
        analyze(model, F.cross_entropy, data, lr=0.1, optimizer=torch.optim.SGD(params, lr=0.1))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive finite"):
            plain_preconditioner(bad)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        HessianTracker(F.cross_entropy, data, lr=0.1, momentum=1.0)
