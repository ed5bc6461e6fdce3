"""analysis.batch_scaling: mini-batch top eigenvalues against the exact expectation over all batches of linear
regression, exact fits, the bisected learning rate against gradient descent's closed form, refusals, and a
model, mode and RNG left as they were."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from secondorder.analysis import (
    BatchScaling,
    batch_scaling,
    batch_scaling_table,
    fit_inverse_batch,
    fit_power_law,
    max_stable_lr,
)


def half_mse(out, target):
    return 0.5 * ((out - target) ** 2).mean()


def regression(n: int = 10, d: int = 3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():  # from the generator, not the global RNG: the same start in any test order
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64) * 0.5)
    return X, y, model


def top(X: torch.Tensor) -> float:
    """The top eigenvalue of the Hessian of 0.5 * mean((X w - y)^2): X^T X / B."""
    return float(torch.linalg.eigvalsh(X.T @ X / len(X))[-1])


def test_mini_batch_eigenvalues_match_the_exact_expectation_over_all_batches():
    """Linear regression: a batch's Hessian is X_B^T X_B / B, so E[lambda_B] over uniformly drawn B-subsets is the
    mean over all C(n, B) subsets, enumerated here. Every measured value must be the top eigenvalue of one of those
    subsets (exact: a batch of B distinct samples), the full value that of X^T X / n, and each mean within 4 of its
    standard errors of the expectation. Calibration of the z-test (this data, 40 batches, batch_scaling with seeds
    0..199): at B = 2 and 4 the 400 z values had mean -0.05, standard deviation 1.02 and range [-3.1, 2.5], so
    seed 0 is no lucky pick. (B = 1 is left out: its 10 values ||x_i||^2 are skewed by one large norm, and a mean
    of 40 draws that misses it gave z = -5.5 once in 200 seeds; no normal z-test fits such a sample.)
    """
    X, y, model = regression()
    n = len(X)
    result = batch_scaling(model, half_mse, (X, y), [4, 2, 10, 2], num_batches=40, optimizers=(), seed=0)
    assert result.batch_sizes == (2, 4, 10) and result.num_samples == n and result.num_parameters == 3
    assert result.full == pytest.approx(top(X), rel=1e-12, abs=0)
    assert result.num_matvecs == result.full_matvecs + sum(p.num_matvecs for p in result.eigenvalues)
    for point in result.eigenvalues:
        B = point.batch_size
        subsets = [top(X[list(c)]) for c in itertools.combinations(range(n), B)]
        assert point.num_batches == 40 and point.num_converged == 40 and len(point.residuals) == 40
        for value in point.values:  # each a real batch of B distinct samples
            assert min(abs(value - s) for s in subsets) <= 1e-10 * value
        expected = sum(subsets) / len(subsets)
        if B == n:
            assert point.values == pytest.approx([result.full] * 40, rel=1e-12) and point.stderr < 1e-12
            continue
        t = torch.tensor(point.values, dtype=torch.float64)
        assert point.mean == pytest.approx(float(t.mean()), rel=1e-15)
        assert point.stderr == pytest.approx(float(t.std()) / math.sqrt(40), rel=1e-12)
        assert abs(point.mean - expected) < 4 * point.stderr, (B, point.mean, expected, point.stderr)


def test_the_fits_recover_exact_lines_and_power_laws():
    sizes = [1, 3, 8, 20, 64]
    exact = fit_inverse_batch(sizes, [2.5 + 7.0 / b for b in sizes])
    assert (exact.intercept, exact.slope) == (pytest.approx(2.5, rel=1e-13), pytest.approx(7.0, rel=1e-13))
    assert exact.r_squared == pytest.approx(1, abs=1e-13) and exact.chi2 < 1e-25 and exact.dof == 3
    assert exact.intercept_stderr < 1e-12 and exact.slope_stderr < 1e-12 and exact.num_samples is None
    weighted = fit_inverse_batch(sizes, [2.5 + 7.0 / b for b in sizes], [0.3, 0.1, 0.0, 0.05, 0.2])
    assert (weighted.intercept, weighted.slope) == (pytest.approx(2.5, rel=1e-12), pytest.approx(7.0, rel=1e-12))
    n = 100  # the finite-population regressor 1/B - 1/n: B = n is the intercept
    finite = fit_inverse_batch(sizes, [2.5 + 7.0 * (1 / b - 1 / n) for b in sizes], num_samples=n)
    assert (finite.intercept, finite.slope) == (pytest.approx(2.5, rel=1e-13), pytest.approx(7.0, rel=1e-13))
    assert finite.predict(n) == pytest.approx(2.5, rel=1e-13) and finite.predict(4) == pytest.approx(2.5 + 7 * 0.24)
    fixed = fit_inverse_batch(sizes, [2.5 + 7.0 * (1 / b - 1 / n) for b in sizes], intercept=2.5, num_samples=n)
    assert fixed.slope == pytest.approx(7.0, rel=1e-13) and fixed.intercept_fixed and fixed.intercept == 2.5
    assert fixed.intercept_stderr == 0 and fixed.dof == 4 and fixed.r_squared == pytest.approx(1, abs=1e-13)
    power = fit_power_law([8, 16, 32, 128], [0.3 * b**0.7 for b in (8, 16, 32, 128)])
    assert (power.exponent, power.coefficient) == (pytest.approx(0.7, rel=1e-13), pytest.approx(0.3, rel=1e-12))
    assert power.r_squared == pytest.approx(1, abs=1e-13) and power.predict(64) == pytest.approx(0.3 * 64**0.7)


def test_the_weighted_fit_is_dense_weighted_least_squares():
    """Noisy values: parameters, R^2 and standard errors equal those of the weighted normal equations, with the
    covariance (X^T W X)^-1 inflated by max(1, chi^2 / dof); the power law equals the log-log least squares."""
    sizes = torch.tensor([2.0, 4, 8, 16, 32, 64], dtype=torch.float64)
    values = torch.tensor([9.1, 6.2, 4.4, 4.1, 3.5, 3.6], dtype=torch.float64)
    stderrs = torch.tensor([1.0, 0.5, 0.3, 0.3, 0.2, 0.1], dtype=torch.float64)
    n, u = 200, 1 / sizes - 1 / 200
    w = 1 / stderrs**2
    for intercept in (None, 3.2):
        fit = fit_inverse_batch(sizes.int().tolist(), values.tolist(), stderrs.tolist(), intercept=intercept,
                                num_samples=n)
        design = torch.stack([torch.ones_like(u), u], 1) if intercept is None else u[:, None]
        target = values if intercept is None else values - intercept
        normal = design.T @ (w[:, None] * design)
        theta = torch.linalg.solve(normal, design.T @ (w * target))
        chi2 = float((w * (target - design @ theta) ** 2).sum())
        cov = torch.linalg.inv(normal) * max(1.0, chi2 / (6 - design.shape[1]))
        mean = float((w * values).sum() / w.sum())
        assert fit.slope == pytest.approx(float(theta[-1]), rel=1e-12)
        assert fit.slope_stderr == pytest.approx(float(cov[-1, -1].sqrt()), rel=1e-12)
        assert fit.chi2 == pytest.approx(chi2, rel=1e-12) and fit.dof == 6 - design.shape[1]
        assert fit.r_squared == pytest.approx(1 - chi2 / float((w * (values - mean) ** 2).sum()), rel=1e-12)
        if intercept is None:
            assert fit.intercept == pytest.approx(float(theta[0]), rel=1e-12)
            assert fit.intercept_stderr == pytest.approx(float(cov[0, 0].sqrt()), rel=1e-12)
    lr = torch.tensor([0.02, 0.05, 0.07, 0.2, 0.3, 0.31], dtype=torch.float64)
    A = torch.stack([torch.ones(6, dtype=torch.float64), sizes.log()], 1)
    coef = torch.linalg.lstsq(A, lr.log()[:, None]).solution.squeeze(1)
    resid = lr.log() - A @ coef
    power = fit_power_law(sizes.int().tolist(), lr.tolist())
    assert power.exponent == pytest.approx(float(coef[1]), rel=1e-12)
    assert power.coefficient == pytest.approx(float(coef[0].exp()), rel=1e-12)
    se = math.sqrt(float(resid @ resid) / 4 / float(((sizes.log() - sizes.log().mean()) ** 2).sum()))
    assert power.exponent_stderr == pytest.approx(se, rel=1e-12)


def gd_divergence_boundary(X, y, w0, steps: int, check_every: int, factor: float) -> float:
    """The smallest learning rate at which full-batch gradient descent on 0.5 * mean((X w - y)^2) from w0 has a
    checked loss above ``factor`` x the initial one, from the closed form in H's eigenbasis (bisection to 1e-13)."""
    H = X.T @ X / len(X)
    w_ls = torch.linalg.lstsq(X, y).solution
    floor = float(half_mse(X @ w_ls, y))
    lam, V = torch.linalg.eigh(H)
    c = V.T @ (w0 - w_ls).squeeze(1)
    initial = floor + 0.5 * float((lam * c**2).sum())

    def diverges(lr: float) -> bool:
        checks = [t for t in range(1, steps + 1) if t % check_every == 0 or t == steps]
        return any(floor + 0.5 * float((lam * c**2 * (1 - lr * lam) ** (2 * t)).sum()) > factor * initial
                   for t in checks)

    lo, hi = 2 / float(lam[-1]), 4 / float(lam[-1])
    assert not diverges(lo) and diverges(hi)
    while hi - lo > 1e-13 * lo:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if diverges(mid) else (mid, hi)
    return hi


def test_the_bisected_learning_rate_of_full_batch_gd_is_its_closed_form_edge():
    """With B = n every SGD step is a gradient-descent step on the quadratic, which diverges exactly above
    2 / lambda_max; within 100 steps the loss doubles a little above it, at the rate eta* solved from the closed
    form. The bisection's bracket must hold eta* and be at most rtol wide."""
    X, y, model = regression()
    steps, rtol = 100, 0.01
    edge = 2 / top(X)
    eta = gd_divergence_boundary(X, y, model.weight.detach().T.clone(), steps, 10, 2.0)
    assert edge < eta < 1.01 * edge  # the doubling costs under 1 % here
    result = max_stable_lr(model, half_mse, (X, y), len(X), "sgd", steps=steps, rtol=rtol, initial_lr=0.1)
    assert result.bracketed and result.lr < eta <= result.lr_diverged <= result.lr * (1 + rtol)
    assert edge / (1 + rtol) < result.lr < edge * 1.01 and result.lr_diverged > edge
    assert result.initial_loss == pytest.approx(float(half_mse(model(X), y).detach()), rel=1e-12)
    assert result.threshold_loss == 2 * result.initial_loss and result.optimizer == "sgd"
    stable = [t for t in result.trials if not t[1]]
    assert all(t[2] == steps for t in stable) and all(t[0] < eta for t in stable)
    assert all(t[0] >= eta for t in result.trials if t[1])
    assert result.num_steps == sum(t[2] for t in result.trials)


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


@pytest.mark.parametrize("change, message", [
    ({"batch_sizes": []}, "at least 2 distinct"),
    ({"batch_sizes": [4]}, "at least 2 distinct"),
    ({"batch_sizes": [2, 11]}, "exceed the 10 samples"),
    ({"batch_sizes": [0, 2]}, "positive integer"),
    ({"batch_sizes": [-3, 2]}, "positive integer"),
    ({"batch_sizes": [2.5, 4]}, "positive integer"),
    ({"batch_sizes": 4}, "sequence of positive integers"),
    ({"num_batches": 1}, "at least 2"),
    ({"num_batches": 0}, "positive integer"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"lr_rtol": 0.0}, "rtol must be a relative tolerance"),
    ({"divergence": 1.0}, "divergence must be above 1"),
    ({"divergence": -2.0}, "divergence must be a positive"),
    ({"lr_bounds": (1.0, 0.1)}, "low < high"),
    ({"optimizers": ("sgd", "rmsprop")}, "optimizer must be one of"),
    ({"seed": -1}, "seed must be"),
    ({"data": (torch.zeros(10, 3), torch.zeros(9, 1))}, "same number of rows"),
    ({"data": torch.zeros(10, 3)}, "(inputs, targets) pair"),
])
def test_bad_input_is_refused_before_any_work(change, message):
    model = Counting()
    kwargs = {"data": (torch.zeros(10, 3), torch.zeros(10, 1)), "batch_sizes": [2, 4], **change}
    data, sizes = kwargs.pop("data"), kwargs.pop("batch_sizes")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        batch_scaling(model, half_mse, data, sizes, **kwargs)
    assert model.calls == 0


def test_max_stable_lr_refuses_bad_input_before_any_work():
    model = Counting()
    data = (torch.zeros(10, 3), torch.ones(10, 1))
    for kwargs, message in [({"batch_size": 11}, "exceed"), ({"optimizer": "lbfgs"}, "optimizer must be"),
                            ({"initial_lr": 0.0}, "initial_lr"), ({"rtol": 1.5}, "rtol")]:
        with pytest.raises(ValueError, match=message):
            max_stable_lr(model, half_mse, data, **{"batch_size": 5, **kwargs})
    assert model.calls == 0


def test_the_model_its_modes_and_the_rng_are_untouched_and_the_result_round_trips(tmp_path):
    """(The same seed giving the same result, and the figure, are checked by tests/cli/test_batch_scaling.py.)"""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))
    model.train()
    model[1].eval()  # one submodule in another mode than its parent
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    ce = nn.functional.cross_entropy
    lr = {"steps": 4, "check_every": 2, "lr_bounds": (0.01, 100.0), "lr_rtol": 0.5}
    result = batch_scaling(model, ce, (x, y), [4, 40], num_batches=2, seed=5, tol=1e-3, **lr)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert [s.optimizer for s in result.lr] == ["sgd", "adam"]
    assert all(len(s.points) == 2 and s.fit_small is None for s in result.lr)
    assert BatchScaling.from_json(result.to_json()) == result
    result.save(tmp_path / "r.json")
    assert BatchScaling.load(tmp_path / "r.json") == result
    table = batch_scaling_table(result)
    assert "| 4 | 2 |" in table and "| 40 | 2 |" in table and "lr_max sgd" in table and "c fixed at λ_full" in table
