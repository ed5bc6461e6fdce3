"""TrustRegion, CubicRegularization and NewtonMR against closed forms, dense references and the
papers' small problems (saddle escape, Rosenbrock), their sub-sampling and their rules."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from secondorder.distributed.reducer import LOCAL
from secondorder.optim import CubicRegularization, NewtonMR, TrustRegion
from secondorder.optim.subsampled import SampledCurvature
from tests.cases import data, mlp
from tests.reliability.snapshot import Snapshot

EXACT = dict(hessian_fraction=1.0)
OPTIMIZERS = {
    "trust region": lambda p, **kw: TrustRegion(p, **{**EXACT, **kw}),
    "ARC": lambda p, **kw: CubicRegularization(p, **{**EXACT, **kw}),
    "Newton-MR": lambda p, **kw: NewtonMR(p, **{**EXACT, **kw}),
}


def point(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=True)


def saddle(x):
    """f(x, y) = x^2/2 + y^4/4 - y^2/2: a strict saddle at 0, minima (0, +-1) with f = -1/4."""
    return (0.5 * x[0] ** 2 + 0.25 * x[1] ** 4 - 0.5 * x[1] ** 2).reshape(1)


def rosenbrock(x):
    return ((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2).reshape(1)


def run(opt, f, x, steps: int, stop: float) -> int:
    """Steps until f(x) < stop (or ``steps``); the number taken."""
    for i in range(steps):
        opt.step(lambda idx=None: f(x))
        if float(f(x.detach())) < stop:
            return i + 1
    return steps


def per_sample(model, X, y, record=None):
    """The closure convention: per-sample losses of the batch, or of the samples ``indices``."""
    def closure(indices=None):
        if record is not None:
            record.append(None if indices is None else indices.clone())
        xb, yb = (X, y) if indices is None else (X[indices], y[indices])
        return F.cross_entropy(model(xb), yb, reduction="none")
    return closure


def test_one_trust_region_step_on_a_convex_quadratic_is_the_newton_step():
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # a random start of norm 0.99 radius costs eps * radius in the sum x + s: 2e-14 at radius 100
    for random_start, radius in ((False, 1e6), (True, 100.0)):
        x = point(0.3, 0.1, -0.2)
        opt = TrustRegion([x], radius=radius, random_start=random_start, **EXACT)
        opt.step(lambda idx=None: (0.5 * x @ A @ x + b @ x).reshape(1))
        newton = torch.linalg.solve(A, -b)
        assert torch.allclose(x.detach(), newton, rtol=0, atol=1e-12), (random_start, x)
        assert opt.last_step.accepted and opt.last_step.ratio == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_method_converges_on_rosenbrock(name):
    x = point(-1.2, 1.0)
    taken = run(OPTIMIZERS[name]([x]), rosenbrock, x, steps=100, stop=1e-12)
    assert taken < 100 and torch.allclose(x.detach(), torch.ones(2, dtype=torch.float64), atol=1e-5)


def test_saddle_escape_needs_a_random_start_or_arc():
    """From (1, 0), on the saddle's stable manifold, g never has a y component: gradient descent
    and Krylov solvers built from g converge to the saddle; the random CG start and ARC's
    perturbed Lanczos start find the negative curvature (the note's [ran] table)."""
    x = point(1.0, 0.0)
    for _ in range(500):  # gradient descent, lr 0.1
        (g,) = torch.autograd.grad(saddle(x).sum(), x)
        with torch.no_grad():
            x -= 0.1 * g
    assert float(saddle(x.detach())) > -1e-12 and float(x.detach()[1]) == 0.0
    stalled = point(1.0, 0.0)
    assert run(TrustRegion([stalled], random_start=False, **EXACT), saddle, stalled, 50, -0.2499) == 50
    assert float(stalled.detach().norm()) < 1e-6  # at the saddle
    for make in (lambda p: TrustRegion(p, **EXACT), lambda p: CubicRegularization(p, **EXACT)):
        x = point(1.0, 0.0)
        assert run(make([x]), saddle, x, 10, -0.2499) <= 5
        assert abs(abs(float(x.detach()[1])) - 1) < 0.02


def test_newton_mr_takes_the_curvature_branch_off_the_manifold():
    x = point(1.0, 1e-8)
    opt = NewtonMR([x], **EXACT)
    exits = []
    for _ in range(10):
        opt.step(lambda idx=None: saddle(x))
        exits.append(opt.last_step.exit)
        if float(saddle(x.detach())) < -0.2499:
            break
    assert float(saddle(x.detach())) < -0.2499 and "negative curvature" in exits


def test_the_hessian_sample_is_uniform_without_replacement_and_fixed_within_a_step():
    X, y = data("mlp", "ce", n=200)
    model, calls = mlp(), []
    opt = TrustRegion(model.parameters(), radius=10.0, seed=1)
    seen = torch.zeros(200)
    for _ in range(30):
        calls.clear()
        opt.step(per_sample(model, X, y, calls))
        sampled = [c for c in calls if c is not None]
        assert len(sampled) == 1  # one sample per iteration, whatever the number of trials
        s = sampled[0]
        assert s.numel() == 10 and s.unique().numel() == 10 and torch.equal(s, s.sort().values)
        assert opt.last_step.function_evaluations == opt.last_step.trials == len(calls) - 2
        seen[s] += 1
    # every position equally likely: 30 x 10 draws over 200, a chi-square test at p ~ 1e-4
    expected = 30 * 10 / 200
    assert float(((seen - expected) ** 2 / expected).sum()) < 280


def test_propagations_count_the_papers_way():
    X, y = data("mlp", "ce", n=200)
    model = mlp()
    opt = TrustRegion(model.parameters(), radius=1.0)
    opt.step(per_sample(model, X, y))
    r = opt.last_step
    assert (r.samples, r.hessian_samples) == (200, 10)
    assert r.propagations == 2 * 200 + 200 * r.function_evaluations + 2 * 10 * (1 + r.hessian_products)
    assert r.hessian_products == r.subproblem_iterations + 1  # CG's products, one for the random start


@pytest.mark.parametrize("curvature", ["hessian", "gauss-newton"])
def test_the_sampled_curvature_is_the_dense_matrix_of_the_sample(curvature):
    X, y = data("mlp", "ce", n=12)
    model = mlp()
    params = list(model.parameters())
    idx = torch.tensor([1, 4, 5, 9])
    out = model(X[idx])
    losses = F.cross_entropy(out, y[idx], reduction="none")
    H = SampledCurvature(losses.sum() / 4, out, params, LOCAL, curvature).to_dense()
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def f(flat):
        pieces, i = {}, 0
        for (name, p) in model.named_parameters():
            pieces[name] = flat[i : i + p.numel()].view_as(p)
            i += p.numel()
        return torch.func.functional_call(model, pieces, (X[idx],))

    if curvature == "hessian":
        dense = torch.autograd.functional.hessian(lambda w: F.cross_entropy(f(w), y[idx]), flat0)
    else:
        J = torch.autograd.functional.jacobian(f, flat0).reshape(4 * 3, -1)
        p = torch.softmax(f(flat0), dim=1)
        Hl = torch.block_diag(*[(torch.diag(q) - torch.outer(q, q)) / 4 for q in p])
        dense = J.T @ Hl @ J
    assert torch.allclose(dense, dense.T, atol=1e-12)
    assert torch.allclose(H, dense, rtol=1e-10, atol=1e-12)


def test_the_radius_and_sigma_follow_the_rules_on_a_scripted_ratio_sequence():
    x = point(0.0)
    tr = TrustRegion([x], radius=1.0, max_radius=3.0, min_radius=0.2)
    radii = []
    for ratio in [0.9, 0.5, 1e-5, math.nan, 0.85, 0.9, 0.9, -1.0, 1e-5, 1e-5, 1e-5]:
        radii.append((tr._update(ratio), tr.radius))
    assert radii == [(True, 2.0), (True, 2.4), (True, 1.2), (True, 0.6), (True, 1.2), (True, 2.4), (True, 3.0),
                     (True, 1.5), (True, 0.75), (True, 0.375), (True, 0.2)]
    assert tr._update(1e-5) is False and tr.radius == 0.2  # at min_radius: the iteration gives up
    arc = CubicRegularization([x], sigma=1.0, min_sigma=0.3, max_sigma=4.0)
    sigmas = [(arc._update(r), arc.sigma) for r in [0.9, 0.5, 0.9, 1e-5, math.nan, 1e-5, 1e-5]]
    assert sigmas == [(True, 0.5), (True, 0.5 / 1.2), (True, 0.3), (True, 0.6), (True, 1.2), (True, 2.4), (True, 4.0)]
    assert arc._update(0.0) is False


def test_rejections_are_capped_and_leave_the_parameters():
    x = point(1.0, 2.0)

    def nan_away_from_start(idx=None):  # every trial point is NaN: every trial is rejected
        moved = float((x.detach() - torch.tensor([1.0, 2.0], dtype=torch.float64)).norm()) > 0
        return rosenbrock(x) * (math.nan if moved else 1.0)

    opt = TrustRegion([x], max_rejections=4, **EXACT)
    opt.step(nan_away_from_start)
    r = opt.last_step
    assert not r.accepted and r.trials == 5 and r.new_loss == r.loss
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert opt.radius == pytest.approx(1.0 / 2**5)


@pytest.mark.parametrize("make, match", [
    (lambda p: TrustRegion(p, radius=0.0), "radius"),
    (lambda p: TrustRegion(p, radius=2.0, max_radius=1.0), "max_radius"),
    (lambda p: TrustRegion(p, eta1=0.1, eta2=0.5), "eta2 <= eta1"),
    (lambda p: TrustRegion(p, gamma1=1.0), "gamma1 > 1"),
    (lambda p: TrustRegion(p, hessian_fraction=1.5), "hessian_fraction"),
    (lambda p: TrustRegion(p, curvature="fisher"), "curvature"),
    (lambda p: CubicRegularization(p, sigma=-1.0), "sigma"),
    (lambda p: CubicRegularization(p, sigma=10.0, max_sigma=1.0), "max_sigma"),
    (lambda p: NewtonMR(p, armijo=0.7), "armijo"),
    (lambda p: NewtonMR(p, inexactness=0.0), "inexactness"),
    (lambda p: TrustRegion([{"params": p[:1]}, {"params": p[1:]}]), "one parameter group"),
])
def test_bad_hyperparameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make(list(mlp().parameters()))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("closure, error, match", [
    (lambda model, X, y: (lambda idx=None: per_sample(model, X, y)(idx) * math.nan), FloatingPointError,
     "not finite; parameters were not changed"),
    (lambda model, X, y: (lambda idx=None: per_sample(model, X, y)(idx).mean()), ValueError, "per-sample losses"),
    (lambda model, X, y: (lambda idx=None: per_sample(model, X, y)(idx).detach()), ValueError, "no graph"),
], ids=["NaN loss", "mean loss", "detached"])
def test_a_refused_step_changes_nothing(name, closure, error, match):
    X, y = data("mlp", "ce", n=20)
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    opt.step(per_sample(model, X, y))
    snapshot = Snapshot(model, opt, generators=[opt.generator])
    with pytest.raises(error, match=match):
        opt.step(closure(model, X, y))
    snapshot.assert_unchanged()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_resumes_bitwise(name):
    X, y = data("mlp", "ce", n=40)
    make = lambda p, seed: OPTIMIZERS[name](p, hessian_fraction=0.25, seed=seed)  # noqa: E731
    model = mlp()
    opt = make(model.parameters(), 3)
    for _ in range(3):
        opt.step(per_sample(model, X, y))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    records = []
    for _ in range(3):
        opt.step(per_sample(model, X, y))
        records.append(opt.last_step)
    resumed = mlp()
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed.parameters(), 99)
    opt2.load_state_dict(saved)
    for record in records:
        opt2.step(per_sample(resumed, X, y))
        assert opt2.last_step == record
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_a_state_of_another_method_is_refused_before_anything_changes():
    X, y = data("mlp", "ce", n=20)
    model = mlp()
    tr, arc = TrustRegion(model.parameters()), CubicRegularization(model.parameters())
    tr.step(per_sample(model, X, y))
    snapshot = Snapshot(model, arc, generators=[arc.generator])
    with pytest.raises(ValueError, match="saved by TrustRegion, not CubicRegularization"):
        arc.load_state_dict(tr.state_dict())
    bad = tr.state_dict()
    bad["second_order"]["radius"] = -1.0
    with pytest.raises(ValueError, match="radius must be a positive number"):
        TrustRegion(model.parameters()).load_state_dict(bad)
    snapshot.assert_unchanged()


def test_gauss_newton_curvature_trains_with_outputs_from_the_closure():
    X, y = data("mlp", "ce", n=60)
    model = mlp()

    def closure(indices=None):
        out = model(X if indices is None else X[indices])
        return F.cross_entropy(out, y if indices is None else y[indices], reduction="none"), out

    opt = TrustRegion(model.parameters(), curvature="gauss-newton", hessian_fraction=0.2)
    first = opt.step(closure)
    for _ in range(10):
        last = opt.step(closure)
    assert last < 0.8 * first
    with pytest.raises(ValueError, match="losses, outputs"):
        opt.step(per_sample(model, X, y))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_at_a_minimum_no_method_moves_or_loops(name):
    x = point(1.0, 1.0)  # Rosenbrock's minimum: g = 0 exactly
    opt = OPTIMIZERS[name]([x])
    opt.step(lambda idx=None: rosenbrock(x))
    assert torch.equal(x.detach(), torch.ones(2, dtype=torch.float64))
    assert not opt.last_step.accepted and opt.last_step.function_evaluations == 0  # no model decrease: no trial


def test_newton_mr_takes_no_step_on_a_decrease_lost_to_rounding():
    """A loss flat to rounding along negative curvature: Armijo holds with equality at every step
    size, so without the strict-decrease guard the forward search doubled to max_step_size (a step
    of 8.6e9 for a decrease of 0). Now no step is taken and the parameters stay bitwise."""
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = NewtonMR([x], hessian_fraction=1.0, max_backtracks=5)
    opt.step(lambda idx=None: (1 + 1e-20 * x[0] - 1e-20 * x[1] ** 2).reshape(1))
    assert not opt.last_step.accepted and opt.last_step.step_size == 0
    assert torch.equal(x.detach(), torch.zeros(2, dtype=torch.float64))
    assert opt.last_step.new_loss == opt.last_step.loss == 1.0
