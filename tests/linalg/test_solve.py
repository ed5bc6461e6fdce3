"""secondorder.solve (CG and MINRES) on matrices with known spectra."""

from __future__ import annotations

import pytest
import torch

import secondorder

N = 100
EPS = torch.finfo(torch.float64).eps


def _true_residuals(A, X, B, damping=0.0):
    return (B - A @ X - damping * X).norm(dim=0) / B.norm(dim=0)


def _gap_bound(iterations, cond):
    """Drift between the recursively updated and the true residual of a Krylov solver, relative to
    ||b||: O(k eps ||A|| max_j ||x_j|| / ||b||) <= O(k eps cond(A)) (Greenbaum 1997); factor 10 slack."""
    return 10 * iterations * EPS * cond


@pytest.fixture(scope="module")
def rhs(spectra):
    return torch.randn(N, 4, generator=spectra.generator(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def spd(spectra):
    lam = torch.linspace(1.0, 10.0, N, dtype=torch.float64)
    return spectra.matrix(lam, seed=1), lam


@pytest.fixture(scope="module")
def indefinite(spectra):
    """Nonsingular and indefinite: 30 eigenvalues in [-3, -0.5], 70 in [0.5, 4]."""
    lam = torch.cat([torch.linspace(-3.0, -0.5, 30), torch.linspace(0.5, 4.0, 70)]).double()
    A, Q = spectra.eig(lam, seed=2)
    return A, lam, Q


def _check_solution(A, B, r, tol, cond, damping=0.0):
    assert r.solution.shape == B.shape
    assert bool(torch.isfinite(r.solution).all())
    assert bool(r.converged.all()), r.residuals
    assert float(r.residuals.max()) <= tol
    true = _true_residuals(A, r.solution, B, damping)
    gap = _gap_bound(r.iterations, cond)
    assert float((true - r.residuals).abs().max()) <= gap, (true, r.residuals)
    assert float(true.max()) <= tol + gap
    # forward error <= cond * relative residual
    exact = torch.linalg.solve(A + damping * torch.eye(A.shape[0], dtype=A.dtype), B)
    err = (r.solution - exact).norm(dim=0) / exact.norm(dim=0)
    assert float(err.max()) <= cond * (tol + gap)


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_cg_spd_several_rhs(tol, spd, rhs):
    A, lam = spd
    r = secondorder.solve(A, rhs, method="cg", tol=tol)
    assert r.method == "cg"
    _check_solution(A, rhs, r, tol, cond=float(lam.max() / lam.min()))
    # all columns advance together: one product per running column per iteration
    assert r.iterations <= N and r.num_matvecs <= 4 * r.iterations


def test_cg_ill_conditioned_needs_more_than_p_iterations(spectra, rhs):
    """cond = 1e3: in floating point CG loses finite termination and needs ~2P iterations here."""
    lam = torch.logspace(-2.0, 1.0, N, dtype=torch.float64)
    A = spectra.matrix(lam, seed=3)
    r = secondorder.solve(A, rhs, tol=1e-8, maxiter=1000)
    _check_solution(A, rhs, r, 1e-8, cond=1e3)
    # a budget too small is reported honestly
    short = secondorder.solve(A, rhs, tol=1e-8, maxiter=5)
    assert short.iterations == 5 and not bool(short.converged.any())
    assert torch.allclose(short.residuals, _true_residuals(A, short.solution, rhs), rtol=1e-10, atol=0)


def test_vector_rhs_and_zero_column(spd, rhs):
    A, lam = spd
    x = secondorder.solve(A, rhs[:, 0], tol=1e-10)
    assert x.solution.shape == (N,)
    assert x.residuals.shape == (1,)
    B = rhs.clone()
    B[:, 2] = 0.0  # zero right-hand side: x = 0 at once, converged, no 0/0
    for method in ("cg", "minres"):
        r = secondorder.solve(A, B, method=method, tol=1e-10)
        assert bool(r.converged.all()) and bool(torch.isfinite(r.solution).all())
        assert bool((r.solution[:, 2] == 0).all())
        assert torch.allclose(r.solution[:, 0], x.solution, rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_damping(method, spd, rhs):
    A, lam = spd
    damping = 2.5
    r = secondorder.solve(A, rhs, damping=damping, method=method, tol=1e-10)
    _check_solution(A, rhs, r, 1e-10, cond=float((lam.max() + damping) / (lam.min() + damping)), damping=damping)
    # the damping changes the answer: it solves (A + d I) x = b, not A x = b
    undamped = torch.linalg.solve(A, rhs)
    assert float((r.solution - undamped).norm() / undamped.norm()) > 0.1


def test_damping_makes_indefinite_matrix_positive_definite_for_cg(indefinite, rhs):
    A, lam, _ = indefinite
    damping = 3.5  # spectrum of A + 3.5 I in [0.5, 7.5]
    r = secondorder.solve(A, rhs, damping=damping, method="cg", tol=1e-10)
    _check_solution(A, rhs, r, 1e-10, cond=15.0, damping=damping)


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_minres_indefinite(tol, indefinite, rhs):
    A, lam, _ = indefinite
    r = secondorder.solve(A, rhs, method="minres", tol=tol)
    assert r.method == "minres"
    cond = float(lam.abs().max() / lam.abs().min())
    _check_solution(A, rhs, r, tol, cond=cond)


def test_cg_stops_on_negative_curvature(indefinite, rhs):
    A, lam, Q = indefinite
    b_neg = Q[:, 0]  # eigenvector of -3: the first direction p = b has p^T A p = -3 ||b||^2
    b_pos = Q[:, 40:50].sum(1)  # in the positive eigenspace: CG converges there in <= 10 steps
    B = torch.stack([b_pos, b_neg], dim=1)
    r = secondorder.solve(A, B, method="cg", tol=1e-10)
    assert bool(torch.isfinite(r.solution).all()) and bool(torch.isfinite(r.residuals).all())
    assert r.converged.tolist() == [True, False]
    assert bool((r.solution[:, 1] == 0).all())  # stopped before any step along the bad direction
    assert float(r.residuals[1]) == pytest.approx(1.0)
    assert float((A @ r.solution[:, 0] - b_pos).norm() / b_pos.norm()) <= 1e-9
    # a generic right-hand side: CG stops unconverged, finite, with an honest residual
    g = secondorder.solve(A, rhs, method="cg", tol=1e-10)
    assert not bool(g.converged.any())
    assert bool(torch.isfinite(g.solution).all())
    assert torch.allclose(g.residuals, _true_residuals(A, g.solution, rhs), rtol=1e-8, atol=0)
    # MINRES solves the same systems
    m = secondorder.solve(A, B, method="minres", tol=1e-10)
    assert bool(m.converged.all())


def test_shape_and_argument_errors(spd):
    A, _ = spd
    for bad in (torch.ones(N + 1, dtype=torch.float64), torch.ones(N, 2, 2, dtype=torch.float64), torch.ones(3, N)):
        with pytest.raises(ValueError, match=rf"b must be \[{N}\] or \[{N}, K\]"):
            secondorder.solve(A, bad)
    with pytest.raises(ValueError, match="b must be"):
        secondorder.solve(A, [1.0] * N)
    with pytest.raises(ValueError, match="square"):
        secondorder.solve(torch.ones(3, 4, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    b = torch.ones(N, dtype=torch.float64)
    with pytest.raises(ValueError, match="method must be 'cg' or 'minres'"):
        secondorder.solve(A, b, method="gmres")
    with pytest.raises(ValueError, match="tol must be a relative tolerance"):
        secondorder.solve(A, b, tol=0.0)
    with pytest.raises(ValueError, match="maxiter must be a positive integer"):
        secondorder.solve(A, b, maxiter=0)
