"""Optimizers: refused steps and refused checkpoints leave parameters, state, counters and generators as they were."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.optim import AdaHessian, SophiaG, SophiaH
from tests.reliability.faults import Refusal, parametrize
from tests.reliability.snapshot import Snapshot, same

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(1))


def _model(width: int = 3) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2)).double()


def _loss(model: nn.Module):
    return lambda: F.cross_entropy(model(X), Y)


def _loss_and_logits(model: nn.Module):
    """SophiaG's closure: the loss and the logits its sampled labels are drawn from."""
    def closure():
        logits = model(X)
        return F.cross_entropy(logits, Y), logits
    return closure


def _stepped(make=AdaHessian, width: int = 3, **kwargs):
    """A model and its optimizer after two steps (state, counters and generator in use)."""
    model = _model(width)
    opt = make(model.parameters(), **kwargs)
    for _ in range(2):
        opt.step(_loss_and_logits(model) if make is SophiaG else _loss(model))
    return model, opt


def _kink(model: nn.Module) -> torch.Tensor:
    """0 in value, with an infinite derivative: sqrt at 0."""
    w = next(model.parameters())[0, 0]
    return torch.sqrt(w - w.detach())


def _step_refused(closure_of, make=AdaHessian):
    def setup():
        model, opt = _stepped(make)
        return (lambda: opt.step(closure_of(model))), Snapshot(model, opt)
    return setup


def _load_refused(saved_by, loaded_into, edit=lambda state: state):
    def setup():
        _, source = saved_by()
        state = edit(copy.deepcopy(source.state_dict()))
        model, opt = loaded_into()
        return (lambda: opt.load_state_dict(state)), Snapshot(model, opt)
    return setup


def _without_writer(state):
    del state["second_order"]["optimizer"]
    return state


def _as_float32(state):
    for s in state["state"].values():
        s["exp_avg"] = s["exp_avg"].float()
    return state


def _bad_generator(state):
    state["second_order"]["generator"] = torch.zeros(3, dtype=torch.uint8)
    return state


def _negative_counter(state):
    state["second_order"]["num_steps"] = -1
    return state


CASES = [
    Refusal("nan loss", _step_refused(lambda m: lambda: F.cross_entropy(m(X), Y) * float("nan")),
            FloatingPointError, "parameters were not changed"),
    Refusal("infinite gradient, finite loss", _step_refused(lambda m: lambda: F.cross_entropy(m(X), Y) + _kink(m)),
            FloatingPointError, "the gradient at step 3 is not finite; parameters were not changed"),
    Refusal("nan loss (SophiaH)", _step_refused(lambda m: lambda: F.cross_entropy(m(X), Y) * float("nan"), SophiaH),
            FloatingPointError, "parameters were not changed"),
    Refusal("vector loss", _step_refused(lambda m: lambda: F.cross_entropy(m(X), Y, reduction="none")),
            ValueError, "must be a scalar tensor"),
    Refusal("detached loss", _step_refused(lambda m: lambda: F.cross_entropy(m(X).detach(), Y)),
            ValueError, "does not depend on the parameters"),
    Refusal("closure raises", _step_refused(lambda m: lambda: m(X[:, :3])),
            RuntimeError, "shapes cannot be multiplied"),
    Refusal("no closure", _step_refused(lambda m: None), ValueError, "call step\\(closure\\)"),
    Refusal("SophiaG closure without logits", _step_refused(lambda m: _loss(m), SophiaG),
            ValueError, "must return \\(loss, logits\\)"),
    Refusal("state of a wider model", _load_refused(lambda: _stepped(width=5), lambda: _stepped(width=3)),
            ValueError, "'exp_avg' buffer of parameter 0 of group 0 is float64 \\[5, 4\\], the parameter is "
                        "float64 \\[3, 4\\]"),
    Refusal("AdaHessian state into SophiaH", _load_refused(_stepped, lambda: _stepped(SophiaH)),
            ValueError, "saved by AdaHessian, not SophiaH"),
    Refusal("former AdaHessian state into SophiaH", _load_refused(_stepped, lambda: _stepped(SophiaH), _without_writer),
            ValueError, "hyperparameters"),
    Refusal("SophiaG state into SophiaH", _load_refused(lambda: _stepped(SophiaG), lambda: _stepped(SophiaH)),
            ValueError, "saved by SophiaG, not SophiaH"),
    Refusal("float32 state into a float64 model", _load_refused(_stepped, _stepped, _as_float32),
            ValueError, "'exp_avg' buffer of parameter 0 of group 0 is float32"),
    Refusal("corrupt generator state", _load_refused(_stepped, _stepped, _bad_generator),
            ValueError, "generator state does not fit"),
    Refusal("negative step counter", _load_refused(_stepped, _stepped, _negative_counter),
            ValueError, "num_steps must be a non-negative integer"),
    Refusal("not an optimizer state", lambda: (lambda opt: ((lambda: opt.load_state_dict({"state": {}})),
                                                            Snapshot(None, opt)))(_stepped()[1]),
            ValueError, "no 'second_order' entry"),
]


@parametrize(CASES)
def test_refused(case):
    case.check()


@pytest.mark.parametrize("make", [AdaHessian, SophiaH])
def test_a_refused_step_leaves_the_run_bitwise_as_if_it_never_happened(make):
    """After a NaN-loss step, state_dict() equals the twin's and the runs continue identically."""
    (model, opt), (twin, opt_twin) = _stepped(make, curvature_every=1), _stepped(make, curvature_every=1)
    with pytest.raises(FloatingPointError, match="parameters were not changed"):
        opt.step(lambda: F.cross_entropy(model(X), Y) * float("nan"))
    assert same(opt.state_dict(), opt_twin.state_dict())
    for _ in range(3):
        opt.step(_loss(model))
        opt_twin.step(_loss(twin))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert same(opt.state_dict(), opt_twin.state_dict())


def test_a_checked_state_still_loads_and_resumes_bitwise():
    model, opt = _stepped()
    saved, twin = copy.deepcopy(opt.state_dict()), copy.deepcopy(model)
    resumed = AdaHessian(twin.parameters())
    resumed.load_state_dict(saved)
    opt.step(_loss(model))
    resumed.step(_loss(twin))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
