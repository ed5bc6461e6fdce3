import pytest
import torch

from secondorder.newton import (
    HessianAt,
    LogisticRegression,
    RidgeRegression,
    armijo_step,
    effective_dimension,
    gram_effective_dimension,
    newton_solve,
)

from .helpers import F64, gen, logistic_problem, ridge_problem


def autograd_loss(problem, w):
    z = problem.features @ w
    if isinstance(problem, LogisticRegression):
        terms = torch.log1p(torch.exp(-problem.labels * z))
    else:
        terms = 0.5 * (z - problem.labels) ** 2
    return terms.mean() + 0.5 * problem.lam * (w @ w)


@pytest.mark.parametrize("make", [logistic_problem, ridge_problem])
def test_loss_gradient_hessian_match_autograd(make):
    problem = make()
    w = torch.randn(problem.dim, dtype=F64, generator=gen(1))
    wr = w.clone().requires_grad_(True)
    loss = autograd_loss(problem, wr)
    (grad,) = torch.autograd.grad(loss, wr)
    hess = torch.autograd.functional.hessian(lambda v: autograd_loss(problem, v), w)
    assert abs(problem.loss(w) - float(loss.detach())) < 1e-12
    torch.testing.assert_close(problem.gradient(w), grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(problem.hessian(w), hess, rtol=0, atol=1e-12)
    a = problem.hessian_factor(w)
    assert a.shape == (problem.num_samples, problem.dim)
    torch.testing.assert_close(a.T @ a + problem.lam * torch.eye(problem.dim, dtype=F64), hess,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [logistic_problem, ridge_problem])
def test_newton_converges(make):
    problem = make(n=200, d=6, lam=1e-3, seed=3)
    result = newton_solve(problem)
    assert result.converged
    assert float(problem.gradient(result.w).norm()) < 1e-10
    assert result.gradient_norm <= 1e-12


def test_newton_from_zero_on_nearly_separable_data():
    g = gen(5)
    x = torch.randn(100, 5, dtype=F64, generator=g)
    y = torch.sign(x @ torch.ones(5, dtype=F64))  # separable: w* large, unit steps overshoot
    problem = LogisticRegression(x, y, 1e-4)
    result = newton_solve(problem)
    assert result.converged and float(problem.gradient(result.w).norm()) < 1e-10
    assert float(result.w.norm()) > 10


def test_ridge_newton_matches_closed_form():
    problem = ridge_problem(n=80, d=5, lam=0.1)
    x, y, n = problem.features, problem.labels, problem.num_samples
    closed = torch.linalg.solve(x.T @ x / n + 0.1 * torch.eye(5, dtype=F64), x.T @ y / n)
    torch.testing.assert_close(newton_solve(problem).w, closed, rtol=0, atol=1e-12)


def test_effective_dimension_is_trace_formula():
    a = torch.randn(50, 7, dtype=F64, generator=gen(2))
    lam = 0.3
    gram = a.T @ a
    expected = torch.trace(gram @ torch.linalg.inv(gram + lam * torch.eye(7, dtype=F64)))
    assert abs(effective_dimension(a, lam) - float(expected)) < 1e-12
    assert 0 < effective_dimension(a, lam) < 7


def test_bad_labels_are_named():
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"-1 or \+1; found 0, 2"):
        LogisticRegression(x, torch.tensor([0.0, 1.0, 2.0, -1.0]), 0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_rejected(bad):
    x = torch.randn(4, 2, dtype=F64)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        RidgeRegression(x, torch.zeros(4, dtype=F64), 0.1)


def test_other_bad_inputs():
    x = torch.randn(4, 2, dtype=F64)
    y = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match="lam"):
        RidgeRegression(x, y, 0.0)
    with pytest.raises(ValueError, match="one entry per row"):
        RidgeRegression(x, torch.ones(3, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="2-D"):
        RidgeRegression(torch.ones(4, dtype=F64), y, 0.1)
    with pytest.raises(ValueError, match="shape"):
        RidgeRegression(x, y, 0.1).gradient(torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("make", [logistic_problem, ridge_problem])
def test_batched_losses_subsets_and_sums(make):
    problem = make(n=30, d=3)
    points = torch.randn(5, 3, dtype=F64, generator=gen(4))
    torch.testing.assert_close(problem.losses(points),
                               torch.stack([autograd_loss(problem, p) for p in points]), rtol=1e-13, atol=0)
    halves = [problem.subset(torch.arange(0, 12)), problem.subset(torch.arange(12, 30))]
    w = points[0]
    torch.testing.assert_close(sum(h.gradient_sum(w) for h in halves) / 30 + problem.lam * w,
                               problem.gradient(w), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(sum(h.loss_sums(points) for h in halves), problem.loss_sums(points),
                               rtol=1e-13, atol=0)
    assert type(halves[0]) is type(problem) and halves[0].lam == problem.lam
    with pytest.raises(ValueError, match=r"points must be \[J, 3\]"):
        problem.losses(w)


def test_gram_effective_dimension_equals_the_factor_one():
    a = torch.randn(40, 6, dtype=F64, generator=gen(8))
    assert gram_effective_dimension(a.T @ a, 0.2) == pytest.approx(effective_dimension(a, 0.2), rel=1e-13)


def test_armijo_step_is_the_first_halving_that_decreases_enough():
    problem = logistic_problem(n=40, d=3, lam=0.01, seed=2)
    w = torch.zeros(3, dtype=F64)
    g = problem.gradient(w)
    p = 40 * g  # far too long: needs halvings
    eta = armijo_step(problem, w, p, g)
    expected = next(0.5**j for j in range(60)
                    if problem.loss(w - 0.5**j * p) <= problem.loss(w) - 1e-4 * 0.5**j * float(g @ p) + 1e-13)
    assert eta == expected < 1
    assert armijo_step(problem, w, -p, g) < 1e-12  # an ascent direction: at most a round-off-sized step


@pytest.mark.parametrize("make", [logistic_problem, ridge_problem])
def test_newton_cg_and_matrix_free_hessian(make):
    problem = make(n=60, d=5, lam=0.01)
    w = torch.randn(5, dtype=F64, generator=gen(3))
    V = torch.randn(5, 2, dtype=F64, generator=gen(4))
    torch.testing.assert_close(problem.hessian_product(w, V), problem.hessian(w) @ V, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(HessianAt(problem, w).to_dense(), problem.hessian(w), rtol=1e-13, atol=1e-15)
    exact, cg = newton_solve(problem), newton_solve(problem, solver="cg")
    assert cg.converged and cg.gradient_norm <= 1e-12
    torch.testing.assert_close(cg.w, exact.w, rtol=0, atol=1e-11)
    with pytest.raises(ValueError, match="solver must be one of"):
        newton_solve(problem, solver="lbfgs")
