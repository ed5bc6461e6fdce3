"""Trust-region (CG-Steihaug) and cubic sub-problems, and MINRES with curvature detection,
against dense float64 oracles on matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from secondorder.linalg import cubic, solve, steihaug
from secondorder.linalg.subproblems import cubic_in_eigenbasis
from tests.linalg.conftest import eigvecs_with_spectrum, generator, matrix_with_spectrum

P = 40
SPD = torch.linspace(0.5, 6.0, P, dtype=torch.float64)
INDEFINITE = torch.cat([torch.tensor([-2.0, -1.0, -0.5]), torch.linspace(0.2, 5.0, P - 3)]).double()


def _g(seed=0):
    return torch.randn(P, generator=generator(seed), dtype=torch.float64)


def _model(H, g, s, sigma=0.0):
    return float(g @ s + 0.5 * s @ H @ s + sigma / 3 * s.norm() ** 3)


def test_steihaug_inside_the_region_is_the_newton_step_with_the_model_from_its_own_products():
    H, g = matrix_with_spectrum(SPD, seed=1), _g()
    r = steihaug(H, g, radius=1e3, rtol=1e-12)
    newton = torch.linalg.solve(H, -g)
    assert r.exit == "residual" and (r.step - newton).norm() <= 1e-9 * newton.norm()
    assert r.model_decrease == pytest.approx(-_model(H, g, r.step), rel=1e-12)
    assert r.num_matvecs == r.iterations


def test_steihaug_stops_on_the_boundary_with_at_least_the_cauchy_decrease():
    H, g = matrix_with_spectrum(SPD, seed=1), _g()
    radius = 0.3 * float(torch.linalg.solve(H, -g).norm())
    r = steihaug(H, g, radius=radius)
    assert r.exit == "boundary" and float(r.step.norm()) == pytest.approx(radius, rel=1e-12)
    t = min(radius / float(g.norm()), float(g @ g) / float(g @ H @ g))  # the Cauchy point -t g
    assert r.model_decrease >= -_model(H, g, -t * g) > 0
    assert r.model_decrease == pytest.approx(-_model(H, g, r.step), rel=1e-12)


def test_steihaug_follows_negative_curvature_to_the_boundary():
    H, Q = eigvecs_with_spectrum(INDEFINITE, seed=2)
    g = 0.7 * Q[:, 0]  # along the eigenvector of -2: the first direction has p^T H p < 0
    r = steihaug(H, g, radius=2.0)
    assert r.exit == "negative curvature" and r.iterations == 1
    assert torch.allclose(r.step, -2.0 * Q[:, 0], atol=1e-12)


def test_steihaug_from_a_start_sees_curvature_the_gradient_misses():
    H = torch.diag(INDEFINITE)  # diagonal: g's zeros on the negative eigenvectors stay exact zeros
    g = torch.cat([torch.zeros(3, dtype=torch.float64), 1e-3 * torch.ones(P - 3, dtype=torch.float64)])
    from_zero = steihaug(H, g, radius=1.0)  # its Krylov space has no negative curvature: the Newton step inside
    start = torch.randn(P, generator=generator(5), dtype=torch.float64)
    from_start = steihaug(H, g, radius=1.0, start=0.99 * start / start.norm())
    assert from_zero.exit == "residual" and float(from_zero.step.norm()) < 0.1
    assert from_start.exit in ("negative curvature", "boundary")
    assert from_start.model_decrease > 100 * from_zero.model_decrease


def _is_global_cubic_minimizer(H, g, s, sigma, tol=1e-8):
    """Cartis, Gould & Toint (2011), Thm 3.1: g + (H + sigma ||s|| I) s = 0 and H + sigma ||s|| I >= 0."""
    shift = sigma * float(s.norm())
    stationary = float((g + H @ s + shift * s).norm()) <= tol * max(1.0, float(g.norm()))
    return stationary and float(torch.linalg.eigvalsh(H)[0]) + shift >= -tol


@pytest.mark.parametrize("spectrum", [SPD, INDEFINITE], ids=["positive definite", "indefinite"])
@pytest.mark.parametrize("sigma", [0.1, 3.0])
def test_cubic_solves_the_model_exactly_in_the_krylov_space(spectrum, sigma):
    H, g = matrix_with_spectrum(spectrum, seed=6), _g(7)
    r = cubic(H, g, sigma, rtol=1e-11, seed=0)
    assert _is_global_cubic_minimizer(H, g, r.step, sigma, tol=1e-9), r
    assert r.model_decrease == pytest.approx(-_model(H, g, r.step, sigma), rel=1e-10)
    assert r.num_matvecs == r.iterations


def test_cubic_stops_early_when_the_sub_problem_gradient_is_small():
    H, g = matrix_with_spectrum(INDEFINITE, seed=6), _g(7)
    r = cubic(H, g, 1.0, rtol=1e-2, seed=0)
    s = r.step
    assert r.exit == "gradient" and r.iterations < P
    assert float((g + H @ s + float(s.norm()) * s).norm()) <= 1e-2 * float(g.norm())


def test_cubic_hard_case_and_the_noise_that_finds_it():
    H = torch.diag(INDEFINITE)  # diagonal: g's zeros on the leftmost eigenvectors stay exact zeros
    g = torch.cat([torch.zeros(3), torch.linspace(1e-3, 2e-3, P - 3)]).double()
    sigma = 1.0
    found = cubic(H, g, sigma, rtol=1e-11, seed=0)
    assert _is_global_cubic_minimizer(H, g, found.step, sigma, tol=1e-8)
    assert sigma * float(found.step.norm()) == pytest.approx(2.0, rel=1e-8)  # mu = -lambda_1: the hard case
    blind = cubic(H, g, sigma, rtol=1e-11, noise=0.0)
    assert float(blind.step.norm()) < 0.01 and blind.model_decrease < 1e-4 * found.model_decrease


def test_the_secular_solver_in_the_hard_case_and_at_a_zero_gradient():
    lam = torch.tensor([-1.0, 1.0, 2.0], dtype=torch.float64)
    a = torch.tensor([0.0, 0.1, 0.1], dtype=torch.float64)
    y = cubic_in_eigenbasis(lam, a, 1.0)
    assert float(y.norm()) == pytest.approx(1.0, rel=1e-12)  # mu = sigma ||y|| = -lambda_1
    assert torch.allclose(a + lam * y + float(y.norm()) * y, torch.zeros(3, dtype=torch.float64), atol=1e-14)
    assert torch.equal(cubic_in_eigenbasis(lam.abs(), torch.zeros(3, dtype=torch.float64), 1.0), torch.zeros(3).double())
    found = cubic(torch.diag(lam), torch.zeros(3, dtype=torch.float64), 1.0, seed=0)  # a saddle: still escapes
    assert found.model_decrease == pytest.approx(1 / 6, rel=1e-10) and abs(float(found.step[0])) == pytest.approx(1.0)


def test_minres_curvature_directions_have_non_positive_curvature_and_descend():
    H = matrix_with_spectrum(INDEFINITE, seed=9)
    B = torch.randn(P, 3, generator=generator(10), dtype=torch.float64)
    r = solve(H, B, method="minres", curvature=True, tol=1e-10)
    assert r.exits == ("negative curvature",) * 3
    for j in range(3):
        d = r.directions[:, j]
        assert float(d @ H @ d) <= 0 and float(B[:, j] @ d) == pytest.approx(float(d @ d), rel=1e-10)
        assert torch.allclose(d, B[:, j] - H @ r.solution[:, j], atol=1e-12)  # r_{k-1} of the returned x_{k-1}


def test_minres_curvature_detection_changes_nothing_on_a_positive_definite_system():
    H, B = matrix_with_spectrum(SPD, seed=11), torch.randn(P, 2, generator=generator(12), dtype=torch.float64)
    plain = solve(H, B, method="minres", tol=1e-10)
    watched = solve(H, B, method="minres", tol=1e-10, curvature=True)
    assert watched.exits == ("solution", "solution") and torch.equal(watched.solution, plain.solution)
    assert plain.exits is None and plain.directions is None


def test_minres_stops_at_newton_mrs_inexactness():
    H, b = matrix_with_spectrum(INDEFINITE, seed=13), _g(14)
    theta = 1e-3
    r = solve(H, b, method="minres", tol=1e-14, inexactness=theta)
    assert r.exits == ("solution",) and r.iterations < P
    assert float(b @ H @ r.solution) >= (1 - theta) * float(b @ b)


@pytest.mark.parametrize("call, match", [
    (lambda H, g: steihaug(H, g, radius=0.0), "radius"),
    (lambda H, g: steihaug(H, g, radius=1.0, start=2 * g / g.norm()), "outside the radius"),
    (lambda H, g: steihaug(H, g[:-1], radius=1.0), "must be a vector"),
    (lambda H, g: cubic(H, g, sigma=-1.0), "sigma"),
    (lambda H, g: cubic(H, g * math.nan, sigma=1.0), "NaN"),
    (lambda H, g: solve(H, g, curvature=True), "MINRES options"),
])
def test_bad_sub_problem_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(matrix_with_spectrum(SPD, seed=1), _g())
