"""Loss scaling (torch.amp.GradScaler) never leaks into the curvature, and overflows skip the step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from secondorder.optim import AdaHessian, SophiaG, SophiaH
from tests.cases import data, mlp

MAKERS = {
    "adahessian": lambda params, **kw: AdaHessian(params, lr=0.05, **kw),
    "sophia_h": lambda params, **kw: SophiaH(params, lr=0.01, rho=1.0, curvature_every=2, **kw),
    "sophia_g": lambda params, **kw: SophiaG(params, lr=0.01, rho=1.0, curvature_every=2, **kw),
}


def closure_for(name, model, X, y):
    if name == "sophia_g":
        def evaluate():
            logits = model(X)
            return F.cross_entropy(logits, y), logits

        return evaluate
    return lambda: F.cross_entropy(model(X), y)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_scaled_steps_equal_unscaled_steps(name):
    """The 3-step quadratic with GradScaler(1024) gives 0.9997 instead of 0.7158 in every public
    AdaHessian; here a power-of-two scale is undone exactly, so the steps agree bit for bit."""
    X, y = data("mlp", "ce")
    plain, scaled = mlp().float(), mlp().float()
    X = X.float()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt_plain = MAKERS[name](plain.parameters())
    opt_scaled = MAKERS[name](scaled.parameters(), grad_scaler=scaler)
    for _ in range(6):
        opt_plain.step(closure_for(name, plain, X, y))
        loss = opt_scaled.step(closure_for(name, scaled, X, y))
    assert loss < 10  # the reported loss is the unscaled one
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(p, q)
    assert scaler.get_scale() == 1024.0


def test_overflow_skips_the_step_and_backs_off():
    X, y = data("mlp", "ce")
    model = mlp().float()
    X = X.float()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-60)
    opt = AdaHessian(model.parameters(), lr=0.05, grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    closure = lambda: 100 * F.cross_entropy(model(X), y)  # noqa: E731  (about 110 * 2^127 overflows float32)
    opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.num_steps == 0 and not opt.state
    assert scaler.get_scale() == 2.0**67
    opt.step(closure)
    assert opt.num_steps == 1 and not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_scale_grows_after_the_interval():
    X, y = data("mlp", "ce")
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    opt = AdaHessian(model.parameters(), lr=0.01, grad_scaler=scaler)
    for _ in range(3):
        opt.step(closure_for("adahessian", model, X, y))
    assert scaler.get_scale() == 16.0 and opt.num_good_steps == 0
