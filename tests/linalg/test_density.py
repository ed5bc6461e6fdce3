"""secondorder.spectral_density (stochastic Lanczos quadrature) on matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch

import secondorder
from secondorder import SpectralDensityResult

N, SEEDS = 40, 200


def _distinct_spectrum():
    """40 distinct eigenvalues, unevenly spaced, spread over [-1, 30.9]."""
    i = torch.arange(N, dtype=torch.float64)
    return torch.sort(torch.linspace(-1.0, 3.0, N, dtype=torch.float64) ** 3 + 0.1 * i).values


@pytest.fixture(scope="module")
def distinct(spectra):
    lam = _distinct_spectrum()
    return spectra.matrix(lam, seed=0), lam


@pytest.fixture(scope="module")
def flat(spectra):
    lam = torch.linspace(-1.0, 3.0, N, dtype=torch.float64)
    return spectra.matrix(lam, seed=2), lam


def _check_quadrature_rules(r: SpectralDensityResult):
    assert not r.nodes.is_complex() and not r.weights.is_complex()
    assert bool(torch.isfinite(r.nodes).all()) and bool(torch.isfinite(r.weights).all())
    # Gauss weights are squares of the first components of T's eigenvectors: non-negative, and they
    # sum to ||v||^2 = 1 (rounding O(eps * steps))
    assert float(r.weights.min()) >= 0.0
    assert torch.allclose(r.weights.sum(1), torch.ones(r.nodes.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_full_lanczos_reproduces_every_eigenvalue(distinct):
    A, lam = distinct
    r = secondorder.spectral_density(A, num_probes=5, num_steps=N, seed=0)
    assert r.nodes.shape == r.weights.shape == (5, N)
    assert r.dimension == N and r.num_matvecs == 5 * N
    _check_quadrature_rules(r)
    norm = float(lam.abs().max())
    for p in range(5):
        used = r.nodes[p][r.weights[p] > 1e-10]
        # with P steps (full reorthogonalization) T is orthogonally similar to A on the whole Krylov
        # space, here all of R^P: nodes are eigenvalues up to backward error O(eps P ||A||) ~ 1e-13
        assert float((used[:, None] - lam[None]).abs().min(1).values.max()) <= 1e-8 * norm
        # ... and every eigenvalue is found (each carries weight (q_i^T v)^2 > 0)
        assert float((lam[:, None] - used[None]).abs().min(1).values.max()) <= 1e-8 * norm
        assert used.numel() == N


def test_num_steps_capped_at_dimension(distinct):
    A, lam = distinct
    r = secondorder.spectral_density(A, num_probes=3, num_steps=3 * N, seed=4)
    ref = secondorder.spectral_density(A, num_probes=3, num_steps=N, seed=4)
    assert r.nodes.shape == (3, N)
    assert r.num_matvecs == 3 * N
    _check_quadrature_rules(r)
    assert torch.equal(r.nodes, ref.nodes) and torch.equal(r.weights, ref.weights)
    # Ritz values lie in [lam_min, lam_max] (Cauchy interlacing): no spurious nodes outside
    used = r.nodes[r.weights > 0]
    slack = 1e-10 * float(lam.abs().max())
    assert float(used.min()) >= float(lam.min()) - slack
    assert float(used.max()) <= float(lam.max()) + slack


@pytest.fixture(scope="module")
def moment_runs(flat):
    A, _ = flat
    out = {}
    for steps in (1, 10):
        rows = []
        for s in range(SEEDS):
            r = secondorder.spectral_density(A, num_probes=1, num_steps=steps, seed=s)
            rows.append([r.moments(1), r.moments(2), r.moments(3), r.trace()[0]])
        out[steps] = torch.tensor(rows, dtype=torch.float64)
    return out


def test_moments_and_trace_unbiased(moment_runs, flat, spectra):
    _, lam = flat
    exact = torch.stack([lam.mean(), (lam**2).mean(), (lam**3).mean(), lam.sum()])
    # Gauss quadrature with 10 nodes is exact for polynomials of degree <= 19, so moment j is
    # v^T A^j v exactly, whose mean over unit Rademacher probes is tr(A^j) / P: z ~ N(0, 1).
    z = spectra.z_score(moment_runs[10], exact)
    assert float(z.abs().max()) <= 4.0, z.tolist()
    # the trace estimate is P times the first moment, probe by probe
    assert torch.allclose(moment_runs[10][:, 3], N * moment_runs[10][:, 0], rtol=1e-12, atol=0)


def test_moment_check_detects_bias_beyond_quadrature_degree(moment_runs, flat, spectra):
    """With one node the rule is exact only to degree 1: the second moment becomes (v^T A v)^2,
    below v^T A^2 v by the spread of the spectrum (Jensen). The same z test must flag it."""
    _, lam = flat
    z1 = float(spectra.z_score(moment_runs[1][:, 0], lam.mean()))
    z2 = float(spectra.z_score(moment_runs[1][:, 1], (lam**2).mean()))
    assert abs(z1) <= 4.0
    assert z2 < -10.0


def test_trace_stderr_calibrated(flat):
    A, lam = flat
    results = [secondorder.spectral_density(A, num_probes=20, num_steps=5, seed=s).trace() for s in range(100)]
    values = torch.tensor([v for v, _ in results])
    stderrs = torch.tensor([e for _, e in results])
    # stderr of the mean of 20 probes; over 100 seeds, the empirical std is known to +-7%
    ratio = float(stderrs.pow(2).mean().sqrt() / values.std())
    assert 0.7 <= ratio <= 1.4
    single = secondorder.spectral_density(A, num_probes=1, num_steps=5, seed=0).trace()
    assert single[1] == math.inf  # one probe: no spread to estimate, so no error bar


def test_density_integrates_to_one(distinct):
    A, lam = distinct
    r = secondorder.spectral_density(A, num_probes=4, num_steps=15, seed=1)
    lo, hi = float(lam.min()), float(lam.max())
    for sigma in (0.05, 0.5, None):
        s = sigma if sigma is not None else 0.01 * (hi - lo)  # documented default: 1% of the range
        grid = torch.linspace(lo - 10 * s, hi + 10 * s, 40001, dtype=torch.float64)
        dens = r.density(grid, sigma)
        assert float(dens.min()) >= 0.0
        # a mixture of unit Gaussians with weights summing to 1 per probe: the mass outside +-10 sigma
        # is ~1e-23 and the trapezoid rule with spacing <= sigma/10 is accurate to far below 1e-6
        assert abs(float(torch.trapezoid(dens, grid)) - 1.0) <= 1e-6
    with pytest.raises(ValueError, match="sigma must be positive"):
        r.density(torch.zeros(3), 0.0)


def test_breakdown_on_three_distinct_eigenvalues(spectra):
    lam = torch.tensor([-1.0] * 10 + [0.5] * 20 + [2.0] * 10, dtype=torch.float64)
    A = spectra.matrix(lam, seed=1)
    R = 200
    r = secondorder.spectral_density(A, num_probes=R, num_steps=20, seed=0)
    _check_quadrature_rules(r)
    # the Krylov space of any start vector is 3-dimensional: every probe stops after 3 products
    assert r.num_matvecs == 3 * R
    distinct = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    assert bool((r.weights[:, 3:] == 0).all())
    assert float((r.nodes[:, :3] - distinct).abs().max()) <= 1e-10
    assert bool((r.weights[:, :3] > 0).all())
    # the weight at eigenvalue mu is ||P_mu v||^2, whose mean over probes is mult(mu) / P
    mult = torch.tensor([10.0, 20.0, 10.0], dtype=torch.float64) / N
    z = spectra.z_score(r.weights[:, :3], mult)
    assert float(z.abs().max()) <= 4.0


def test_plot_writes_png(distinct, tmp_path):
    A, _ = distinct
    r = secondorder.spectral_density(A, num_probes=2, num_steps=10, seed=0)
    for log in (True, False):
        path = tmp_path / f"density_{log}.png"
        r.plot(path, log=log)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_bad_input_and_seeds(distinct, spectra):
    A, _ = distinct
    for kwargs in ({"num_probes": 0}, {"num_steps": 0}, {"num_probes": 2.0}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            secondorder.spectral_density(A, **kwargs)
    with pytest.raises(ValueError, match="symmetric"):
        secondorder.spectral_density(torch.triu(torch.ones(5, 5, dtype=torch.float64)))
    state = torch.get_rng_state()
    a = secondorder.spectral_density(A, num_probes=3, num_steps=8, seed=9)
    b = secondorder.spectral_density(A, num_probes=3, num_steps=8, seed=9)
    g = secondorder.spectral_density(A, num_probes=3, num_steps=8, seed=spectra.generator(9))
    c = secondorder.spectral_density(A, num_probes=3, num_steps=8, seed=10)
    secondorder.spectral_density(A, num_probes=3, num_steps=8, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.weights, g.weights)
    assert not torch.equal(a.weights, c.weights)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_probe_chunks_give_the_same_density_as_all_probes_at_once(reorthogonalize):
    A = torch.diag(torch.linspace(-1.0, 3.0, 60, dtype=torch.float64))
    whole = secondorder.spectral_density(A, num_probes=5, num_steps=12, seed=3, reorthogonalize=reorthogonalize)
    for chunked in (secondorder.spectral_density(A, num_probes=5, num_steps=12, seed=3, probe_chunk=2,
                                                 reorthogonalize=reorthogonalize),
                    secondorder.spectral_density(A, num_probes=5, num_steps=12, seed=3, reorthogonalize=reorthogonalize,
                                                 memory_budget=2 * (15 if reorthogonalize else 4) * 60 * 8)):
        assert torch.allclose(chunked.nodes, whole.nodes, atol=1e-12) and torch.allclose(chunked.weights, whole.weights,
                                                                                          atol=1e-12)
        assert chunked.num_matvecs == whole.num_matvecs


def test_a_memory_budget_below_one_probe_is_refused_with_what_to_do():
    A = torch.eye(50, dtype=torch.float64)
    with pytest.raises(ValueError, match="above memory_budget=100; raise it, take fewer steps or pass reorthogonalize"):
        secondorder.spectral_density(A, num_probes=2, num_steps=10, memory_budget=100)
    with pytest.raises(ValueError, match="not both"):
        secondorder.spectral_density(A, probe_chunk=1, memory_budget=10**6)
