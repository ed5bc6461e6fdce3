"""The KFAC optimizer against KFACOperator and closed forms: least squares in one step, the
preconditioned step, the running averages, KL clipping, loss scaling, bitwise resume and
refusals that change nothing."""

from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.operators.kfac import KFACOperator
from secondorder.optim import KFAC
from tests.cases import gen
from tests.reliability.snapshot import Snapshot

D = torch.float64


def _net(layers: Callable[[], tuple[nn.Module, ...]]) -> nn.Module:
    """A float64 Sequential of the ``layers()``, built from seed 0 (the global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(*layers()).double()


def _mlp() -> nn.Module:
    return _net(lambda: (nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)))


def _data(n: int = 16, seed: int = 0):
    return torch.randn(n, 4, generator=gen(seed), dtype=D), torch.randint(0, 3, (n,), generator=gen(seed + 1))


def _closure(model, X, y):
    def closure():
        logits = model(X)
        return F.cross_entropy(logits, y), logits
    return closure


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_one_step_solves_linear_least_squares():
    X = torch.randn(200, 6, generator=gen(2), dtype=D)
    Y = X @ torch.randn(6, 2, generator=gen(3), dtype=D) + 0.3
    layer = _net(lambda: (nn.Linear(6, 2),))
    opt = KFAC(layer, nn.MSELoss(), lr=1.0, damping=1e-24, momentum=0.0, kl_clip=None, fisher="ggn")
    opt.step(lambda: (F.mse_loss(out := layer(X), Y), out))
    solution = torch.linalg.lstsq(torch.cat([X, torch.ones(200, 1, dtype=D)], 1), Y).solution
    assert torch.allclose(torch.cat([layer[0].weight.T, layer[0].bias[None]]), solution, atol=1e-10)


def test_the_step_is_the_damped_inverse_of_the_operator_times_the_gradient():
    X, y = _data()
    model = _mlp()
    before = _flat(model)
    op = KFACOperator(model, nn.CrossEntropyLoss(), (X, y), fisher="ggn")
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(X), y), model.parameters())])
    expected = before - 0.1 * (op.inverse(1e-2) @ g)
    opt = KFAC(model, lr=0.1, damping=1e-2, momentum=0.9, kl_clip=None, fisher="ggn")
    opt.step(_closure(model, X, y))
    assert torch.allclose(_flat(model), expected, rtol=1e-12, atol=1e-14)


def test_factors_are_running_averages_refreshed_on_their_steps():
    X, y = _data()
    model = _mlp()
    opt = KFAC(model, fisher="ggn", factor_every=2, factor_decay=0.9)
    first = KFACOperator(model, nn.CrossEntropyLoss(), (X[:8], y[:8])).factors
    opt.step(_closure(model, X[:8], y[:8]))
    opt.step(_closure(model, X[8:], y[8:]))  # not a factor step
    assert all(torch.equal(f.A, e.A) and torch.equal(f.S, e.S) for f, e in zip(opt.factors, first))
    third = KFACOperator(model, nn.CrossEntropyLoss(), (X, y)).factors
    opt.step(_closure(model, X, y))
    for f, a, b in zip(opt.factors, first, third):
        assert torch.allclose(f.A, 0.9 * a.A + 0.1 * b.A, rtol=1e-13)
        assert torch.allclose(f.S, 0.9 * a.S + 0.1 * b.S, rtol=1e-13)


def test_kl_clipping_scales_the_preconditioned_step():
    X, y = _data()
    free, clipped = _mlp(), _mlp()
    KFAC(free, lr=10.0, momentum=0.0, kl_clip=None, fisher="ggn").step(_closure(free, X, y))
    opt = KFAC(clipped, lr=10.0, momentum=0.0, kl_clip=1e-3, fisher="ggn")
    opt.step(_closure(clipped, X, y))
    start = _flat(_mlp())
    v_free, v_clipped = (start - _flat(free)) / 10.0, (start - _flat(clipped)) / 10.0
    origin = _mlp()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(origin(X), y), origin.parameters())])
    nu = math.sqrt(1e-3 / (float(v_free @ g) * 100.0))
    assert nu < 1 and torch.allclose(v_clipped, nu * v_free, rtol=1e-11)


def test_unsupported_layers_must_be_excluded_and_then_take_plain_momentum_steps():
    X, y = _data()
    normed = _net(lambda: (nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)))
    with pytest.raises(ValueError, match=r"1\.weight \(LayerNorm\)"):
        KFAC(normed)
    opt = KFAC(normed, params=lambda name, p: not name.startswith("1."), fisher="ggn", kl_clip=None, lr=0.1)
    assert opt.plain_parameters == ["1.weight", "1.bias"]
    norm_before = normed[1].weight.detach().clone()
    (g,) = torch.autograd.grad(F.cross_entropy(normed(X), y), normed[1].weight)
    opt.step(_closure(normed, X, y))
    assert torch.allclose(normed[1].weight, norm_before - 0.1 * g, rtol=1e-13)


def test_loss_scaling_gives_the_unscaled_step_and_an_overflow_skips_it():
    X, y = _data()
    plain, scaled = _mlp(), _mlp()
    KFAC(plain, fisher="empirical").step(_closure(plain, X, y))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    KFAC(scaled, fisher="empirical", grad_scaler=scaler).step(_closure(scaled, X, y))
    assert torch.equal(_flat(plain), _flat(scaled))  # a power of two scales and unscales exactly
    huge = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-60)
    model = _mlp().float()
    opt = KFAC(model, grad_scaler=huge)

    def overflowing():  # a finite loss whose scaled derivatives overflow float32
        logits = model(X.float())
        return 1e6 * F.cross_entropy(logits, y), logits

    opt.step(overflowing)
    assert torch.equal(_flat(model), _flat(_mlp().float())) and huge.get_scale() == 2.0**67 and opt.num_steps == 0


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_state_dict_resumes_bitwise(fisher):
    X, y = _data(24)
    make = lambda m, seed: KFAC(m, fisher=fisher, factor_every=2, inverse_every=3, seed=seed)  # noqa: E731
    model = _mlp()
    opt = make(model, 3)
    for i in range(4):
        opt.step(_closure(model, X[i:i + 12], y[i:i + 12]))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for i in range(4, 9):
        opt.step(_closure(model, X[i:i + 12], y[i:i + 12]))
    resumed = _mlp()
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed, 99)
    opt2.load_state_dict(saved)
    for i in range(4, 9):
        opt2.step(_closure(resumed, X[i:i + 12], y[i:i + 12]))
    assert torch.equal(_flat(model), _flat(resumed))


@pytest.mark.parametrize("make, match", [
    (lambda m: KFAC(m, damping=0.0), "damping"),
    (lambda m: KFAC(m, momentum=1.0), "momentum"),
    (lambda m: KFAC(m, factor_every=0), "factor_every"),
    (lambda m: KFAC(m, fisher="kfra"), "fisher"),
    (lambda m: KFAC(m, params=["0.weight"]), "select both or neither"),
])
def test_bad_hyperparameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make(_mlp())


@pytest.mark.parametrize("closure_of, error, match", [
    (lambda m, X, y: (lambda: (F.cross_entropy(m(X), y) * math.nan, m(X))), FloatingPointError,
     "parameters were not changed"),
    (lambda m, X, y: (lambda: F.cross_entropy(m(X), y)), ValueError, r"return \(loss, logits\)"),
    (lambda m, X, y: (lambda: (F.cross_entropy(m(X), y), m(X)[:, 0])), ValueError, "logits"),
], ids=["NaN loss", "no logits", "vector outputs"])
def test_a_refused_step_changes_nothing(closure_of, error, match):
    X, y = _data()
    model = _mlp()
    opt = KFAC(model, factor_every=1)
    opt.step(_closure(model, X, y))
    snapshot = Snapshot(model, opt, generators=[opt.generator])
    with pytest.raises(error, match=match):
        opt.step(closure_of(model, X, y))
    snapshot.assert_unchanged()


def test_a_state_of_another_model_is_refused_before_anything_changes():
    X, y = _data()
    wide = _net(lambda: (nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)))
    source = KFAC(wide)
    source.step(_closure(wide, X, y))
    model = _mlp()
    opt = KFAC(model)
    snapshot = Snapshot(model, opt, generators=[opt.generator])
    state = source.state_dict()
    state["state"] = {}
    with pytest.raises(ValueError, match="saved on another model"):
        opt.load_state_dict(state)
    snapshot.assert_unchanged()
