"""secondorder.trace on dense float64 matrices with known spectra."""

from __future__ import annotations

import math
import re

import pytest
import torch

import secondorder
from secondorder import Block, DenseOperator
from secondorder.linalg.results import TraceResult

METHODS = ("hutchinson", "hutch++", "xtrace")
MINIMUM = {"hutchinson": 1, "hutch++": 3, "xtrace": 4}
N, M, SEEDS = 200, 30, 200


# ---- fixtures: one set of 200-seed runs per method, shared by the statistical tests ------------


@pytest.fixture(scope="module")
def indefinite(spectra):
    """A flat, indefinite spectrum (no decay: the hardest case for the deflating estimators)."""
    lam = torch.linspace(-1.0, 3.0, N, dtype=spectra.dtype)
    return spectra.matrix(lam, seed=1), float(lam.sum())


@pytest.fixture(scope="module")
def runs(indefinite):
    A, _ = indefinite
    return {method: [secondorder.trace(A, M, method=method, seed=s) for s in range(SEEDS)] for method in METHODS}


@pytest.fixture(scope="module")
def blocked(spectra):
    """Blocks of unequal sizes, with a diagonal shift that differs per block so that the block
    traces are far from the proportional share ``size / N * tr(A)``."""
    lam = torch.linspace(-1.0, 3.0, N, dtype=spectra.dtype)
    shift = torch.cat([torch.full((37,), 5.0), torch.full((83,), -3.0), torch.zeros(80)]).to(spectra.dtype)
    A = spectra.matrix(lam, seed=2) + torch.diag(shift)
    blocks = [Block("a", 0, 37), Block("b", 37, 120), Block("c", 120, 200)]
    exact = {b.name: float(A.diagonal()[b.start : b.stop].sum()) for b in blocks}
    return A, blocks, exact


def _values(results):
    return torch.tensor([r.value for r in results], dtype=torch.float64)


def _stderrs(results):
    return torch.tensor([r.stderr for r in results], dtype=torch.float64)


# ---- unbiasedness and calibration -------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_over_seeds(method, runs, indefinite, spectra):
    _, exact = indefinite
    values = _values(runs[method])
    # z ~ N(0, 1) for an unbiased estimator over 200 independent seeds; |z| > 4 has p ~ 6e-5.
    z = float(spectra.z_score(values, exact))
    assert abs(z) <= 4.0, f"{method}: mean {values.mean():.4f} vs exact {exact:.4f} (z = {z:.2f})"
    # the check has power: the standard error of the mean is a small fraction of the trace
    assert values.std() / math.sqrt(SEEDS) < 0.01 * abs(exact)


def test_hutchinson_variance_matches_theory(runs, indefinite):
    """Var of Hutchinson with Rademacher probes is 2 (||A||_F^2 - sum_i A_ii^2) / m."""
    A, _ = indefinite
    theory = math.sqrt(2 * float((A**2).sum() - (A.diagonal() ** 2).sum()) / M)
    values, stderrs = _values(runs["hutchinson"]), _stderrs(runs["hutchinson"])
    # the sample std of 200 near-normal values has relative standard error 1/sqrt(2*199) = 5%;
    # [0.8, 1.25] is about 4 of those.
    assert 0.8 <= float(values.std()) / theory <= 1.25
    # the reported stderr^2 is an unbiased estimate of the variance: averaged over 200 seeds of
    # 29 dof each its relative standard error is sqrt(2 / (29 * 200)) ~ 2%, so RMS within 10%.
    rms = float(stderrs.pow(2).mean().sqrt())
    assert 0.9 <= rms / theory <= 1.1


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_reported_stderr_matches_spread_across_seeds(method, runs):
    # Hutch++'s stderr is Hutchinson's on the deflated matrix, valid conditionally on the sketch.
    # Ratio of RMS reported stderr to the empirical std (itself +-5% from 200 seeds): [0.7, 1.4].
    values, stderrs = _values(runs[method]), _stderrs(runs[method])
    ratio = float(stderrs.pow(2).mean().sqrt() / values.std())
    assert 0.7 <= ratio <= 1.4, f"{method}: reported/empirical stderr = {ratio:.2f}"


@pytest.mark.parametrize("method", METHODS)
def test_confidence_interval_coverage(method, runs, indefinite):
    _, exact = indefinite
    covered = 0
    for r in runs[method]:
        lo, hi = r.confidence_interval(0.95)
        assert lo < r.value < hi
        lo50, hi50 = r.confidence_interval(0.5)
        assert lo < lo50 < r.value < hi50 < hi
        covered += lo <= exact <= hi
    # nominal 95%; the binomial standard error over 200 seeds is 1.5%, and XTrace's leave-one-out
    # stderr is known to be optimistic by 15-25% (its estimates are correlated): >= 85% required.
    assert covered / SEEDS >= 0.85, f"{method}: 95% interval covers the trace in {covered}/{SEEDS} seeds"


@pytest.mark.parametrize("value, n", [(7.7500000000000036, 5), (0.1, 3), (1 / 3, 7), (2.5, 4)])
def test_equal_samples_give_a_point_interval(value, n):
    # torch's mean of n equal floats can be off by an ulp (it depends on the CPU's vector path), which
    # left std ~1e-16 and every resample without spread: the interval is the point, never an error
    r = TraceResult(value, 0.0, 9, "hutchinson", n - 1, (), (value,) * n)
    mean = float(torch.tensor((value,) * n, dtype=torch.float64).mean())
    assert r.confidence_interval(0.95) == (mean, mean) == r.confidence_interval(0.5)


def test_dof_and_matvec_count(indefinite):
    A, _ = indefinite
    op = DenseOperator(A)
    expected_dof = {"hutchinson": M - 1, "hutch++": M - 2 * (M // 3) - 1, "xtrace": M // 2 - 1}
    for method in METHODS:
        before = op.num_matvecs
        r = secondorder.trace(op, M, method=method, seed=0)
        assert r.num_matvecs == M == op.num_matvecs - before
        assert r.dof == expected_dof[method]
        assert r.method == method


# ---- variance reduction on a decaying spectrum -----------------------------------------------


def test_deflation_beats_hutchinson_on_decaying_spectrum(spectra):
    lam = torch.arange(1, N + 1, dtype=spectra.dtype) ** -2.0
    A, exact = spectra.matrix(lam, seed=3), float(lam.sum())
    errors = {
        method: torch.tensor([abs(secondorder.trace(A, M, method=method, seed=s).value - exact) for s in range(100)])
        for method in METHODS
    }
    # Hutchinson's error ~ sqrt(2/m) ||A||_F ~ 0.27; Hutch++ ~ sqrt(2/(m/3)) ||A - A_10||_F ~ 0.008
    # (tail sum_{i>10} i^-4 ~ 1/3000), a ratio of ~30; >= 10 leaves a factor 3 for an imperfect sketch.
    for method in ("hutch++", "xtrace"):
        ratio = float(errors["hutchinson"].median() / errors[method].median())
        assert ratio >= 10, f"{method} is only {ratio:.1f}x more accurate than hutchinson"


# ---- per-block traces ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_block_traces_sum_to_total_and_are_unbiased(method, blocked, spectra):
    A, blocks, exact = blocked
    op = DenseOperator(A, blocks=blocks)
    results = [secondorder.trace(op, M, method=method, seed=s) for s in range(SEEDS)]
    for r in results:
        assert [b.name for b in r.blocks] == ["a", "b", "c"]
        assert [b.size for b in r.blocks] == [37, 83, 80]
        # the blocks partition the coordinates: their sum is the total up to rounding
        assert math.isclose(sum(b.value for b in r.blocks), r.value, rel_tol=1e-12, abs_tol=1e-10)
        assert all(b.stderr > 0 and math.isfinite(b.stderr) for b in r.blocks)
        assert r.block("b").value == r.blocks[1].value
        assert math.isclose(r.block("a").per_parameter, r.block("a").value / 37)
    for name, value in exact.items():
        samples = torch.tensor([r.block(name).value for r in results])
        z = float(spectra.z_score(samples, value))
        assert abs(z) <= 4.0, f"{method} block {name}: mean {samples.mean():.3f} vs {value:.3f} (z = {z:.2f})"
    # the total over blocks is unbiased for tr(A) too
    z_total = float(spectra.z_score(_values(results), sum(exact.values())))
    assert abs(z_total) <= 4.0
    with pytest.raises(KeyError, match="no block 'missing'"):
        results[0].block("missing")


# ---- exact answers ---------------------------------------------------------------------------


def test_hutchpp_exact_on_low_rank(spectra):
    lam = torch.zeros(N, dtype=spectra.dtype)
    lam[:5] = torch.tensor([7.0, 4.0, -3.0, 1.5, -0.25])  # rank 5 < m/3 = 10
    A = spectra.matrix(lam, seed=4)
    exact = float(lam.sum())
    for s in range(5):
        r = secondorder.trace(A, M, method="hutch++", seed=s)
        # range(A S) = range(A) almost surely, so A (I - QQ^T) = 0 and only rounding is left:
        # O(eps * rank * ||A||) ~ 1e-14.
        assert abs(r.value - exact) <= 1e-10
        assert r.stderr <= 1e-10


def test_xtrace_exact_on_low_rank(spectra):
    lam = torch.zeros(N, dtype=spectra.dtype)
    lam[:5] = torch.tensor([7.0, 4.0, -3.0, 1.5, -0.25])  # rank 5 < m/2 - 1: every leave-one-out sketch spans range(A)
    A = spectra.matrix(lam, seed=5)
    for s in range(5):
        r = secondorder.trace(A, M, method="xtrace", seed=s)
        assert abs(r.value - float(lam.sum())) <= 1e-10
        assert r.stderr <= 1e-10


def test_hutchinson_exact_on_diagonal_matrix_streaming_in_chunks(spectra):
    # z_i^2 = 1 for Rademacher probes: every probe gives exactly tr(D), whatever the chunking.
    d = torch.linspace(-2.0, 5.0, 50, dtype=spectra.dtype)
    op = DenseOperator(torch.diag(d))
    r = secondorder.trace(op, 23, method="hutchinson", seed=0, probe_chunk=7)  # streamed: 7 + 7 + 7 + 2 probes
    assert r.num_matvecs == 23
    assert abs(r.value - float(d.sum())) <= 1e-12
    assert r.stderr <= 1e-12


# ---- input validation, seeds, RNG ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_budget_below_minimum_rejected(method, indefinite):
    A, _ = indefinite
    minimum = MINIMUM[method]
    with pytest.raises(ValueError, match=re.escape(f"{method} needs num_matvecs >= {minimum}")):
        secondorder.trace(A, minimum - 1, method=method, seed=0)
    with pytest.raises(ValueError, match="integer"):
        secondorder.trace(A, 12.0, method=method, seed=0)
    r = secondorder.trace(A, minimum, method=method, seed=0)  # the minimum itself is accepted
    assert math.isfinite(r.value)


def test_unknown_method_rejected(indefinite):
    A, _ = indefinite
    with pytest.raises(ValueError, match=r"unknown trace method 'hutch\+\+\+'.*hutchinson"):
        secondorder.trace(A, 10, method="hutch+++", seed=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(3, 4, dtype=torch.float64), "square 2-D tensor"),
        (torch.zeros(4, dtype=torch.float64), "square 2-D tensor"),
        (torch.zeros(2, 3, 3, dtype=torch.float64), "square 2-D tensor"),
        (torch.eye(4, dtype=torch.int64), "floating-point"),
        (torch.triu(torch.ones(5, 5, dtype=torch.float64)), "symmetric"),
    ],
)
def test_bad_matrix_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        secondorder.trace(bad, 10, seed=0)


def test_non_tensor_rejected():
    with pytest.raises(TypeError, match="LinearOperator or a dense symmetric torch.Tensor"):
        secondorder.trace([[1.0, 0.0], [0.0, 1.0]], 10, seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_seed_reproducible_and_global_rng_untouched(method, indefinite, spectra):
    A, _ = indefinite
    state = torch.get_rng_state()
    a = secondorder.trace(A, M, method=method, seed=11)
    b = secondorder.trace(A, M, method=method, seed=11)
    c = secondorder.trace(A, M, method=method, seed=12)
    g = secondorder.trace(A, M, method=method, seed=spectra.generator(11))
    fresh1 = secondorder.trace(A, M, method=method, seed=None)
    fresh2 = secondorder.trace(A, M, method=method, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b  # frozen dataclass: value, stderr and every block identical
    assert a == g  # a generator seeded with 11 gives the same probes as seed=11
    assert a.value != c.value
    assert fresh1.value != fresh2.value  # seed=None draws fresh OS entropy
    with pytest.raises(TypeError, match="seed must be"):
        secondorder.trace(A, M, method=method, seed="11")


def test_progress_bar_changes_nothing_but_stderr(capsys):
    """With progress=True a bar goes to stderr; the result and the matvec count are unchanged."""
    A = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    for method in ("hutchinson", "hutch++", "xtrace"):
        quiet = secondorder.trace(A, 12, method=method, seed=3)
        shown = secondorder.trace(A, 12, method=method, seed=3, progress=True)
        assert shown == quiet
    eig = secondorder.eigenvalues(A, 2, seed=0, progress=True)
    assert eig.num_matvecs == secondorder.eigenvalues(A, 2, seed=0).num_matvecs
    sd = secondorder.spectral_density(A, 2, 10, seed=0, progress=True)
    assert sd.num_matvecs == 20
    sol = secondorder.solve(A, torch.ones(40, dtype=torch.float64), progress=True)
    assert sol.num_matvecs == sol.iterations
    assert secondorder.diagonal(A, 8, seed=0, progress=True).num_matvecs == 8
    captured = capsys.readouterr()
    assert "matvec" in captured.err and captured.out == ""
