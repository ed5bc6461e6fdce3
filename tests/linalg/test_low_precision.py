"""float16/bfloat16 operators: products in their dtype, the algebra around them in float32, and
no residual certified below what the rounded products resolve (issue 14)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder

HALF = [torch.bfloat16, torch.float16]


def _problem(dtype):
    """A model rounded to ``dtype``, its operator, and the float64 Hessian of the same rounded weights."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
        X, y = torch.randn(64, 10).to(dtype), torch.randint(0, 3, (64,))
    exact = secondorder.HessianOperator(copy.deepcopy(model).double(), F.cross_entropy, [(X.double(), y)]).to_dense()
    assert torch.allclose(exact, exact.T, atol=1e-12)
    return secondorder.HessianOperator(model, F.cross_entropy, [(X, y)]), exact


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigenvalues_certified_in_half_precision_lie_within_their_residual(dtype, method):
    """Every converged pair's eigenvalue is within its reported residual of an exact eigenvalue
    (|theta - lambda| <= ||A y - theta y|| for a unit y), and the residual is above the products' rounding."""
    H, exact = _problem(dtype)
    r = secondorder.eigenvalues(H, k=3, method=method, seed=0, max_matvecs=600)
    assert r.eigenvalues.dtype == torch.float32 and r.converged.any()
    spectrum = torch.linalg.eigvalsh(exact)
    for theta, res, ok in zip(r.eigenvalues.double(), r.residuals.double(), r.converged):
        if ok:
            assert (spectrum - theta).abs().min() <= res * (1 + 1e-3)
    assert (r.residuals > 0).all()


@pytest.mark.parametrize("dtype", HALF)
def test_a_tolerance_below_the_products_roundoff_is_refused(dtype):
    H, _ = _problem(dtype)
    with pytest.raises(ValueError, match="below what .* products resolve"):
        secondorder.eigenvalues(H, k=2, tol=1e-5)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["hutch++", "xtrace", "hutchinson"])
def test_trace_in_half_precision_matches_float64_with_the_same_probes(dtype, method):
    """The dense algebra (QR) runs in float32: the estimate is the float64 one up to the products' rounding."""
    H, exact = _problem(dtype)
    got = secondorder.trace(H, 30, method=method, seed=0)
    want = secondorder.trace(exact, 30, method=method, seed=0)
    assert abs(got.value - want.value) <= 0.02 * abs(want.value)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["xdiag", "hutchinson"])
def test_diagonal_in_half_precision_matches_float64_with_the_same_probes(dtype, method):
    H, exact = _problem(dtype)
    got = secondorder.diagonal(H, 20, method=method, seed=0).value
    want = secondorder.diagonal(exact, 20, method=method, seed=0).value
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("dtype", HALF)
def test_spectral_density_and_solve_run_in_half_precision(dtype):
    H, exact = _problem(dtype)
    d = secondorder.spectral_density(H, num_probes=2, num_steps=20, seed=0)
    assert torch.isfinite(d.nodes).all() and torch.allclose(d.weights.sum(1), torch.ones(2, dtype=torch.float64))
    b = torch.ones(H.shape[0])
    s = secondorder.solve(H, b, damping=1.0, tol=1e-2)
    want = torch.linalg.solve(exact + torch.eye(H.shape[0], dtype=torch.float64), b.double())
    assert (s.solution.double() - want).norm() <= 0.05 * want.norm()
