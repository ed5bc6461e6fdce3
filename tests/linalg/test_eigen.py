"""secondorder.eigenvalues (thick-restart Lanczos and block power) on matrices with known spectra."""

from __future__ import annotations

import pytest
import torch

import secondorder

N = 300
KEYS = {"largest": lambda t: -t, "smallest": lambda t: t, "magnitude": lambda t: -t.abs()}


def _negative_dominant():
    """The largest-magnitude eigenvalue is negative; +-0.5 tie in magnitude at the 5th place."""
    return torch.cat([torch.tensor([-5.0, 3.0, 2.99, 1.0]), torch.linspace(0.5, -0.5, N - 4)]).double()


def _clustered():
    """Tight clusters (gaps 1e-3 relative to ||A|| = 10) at both ends, above a continuous bulk."""
    ends = torch.tensor([10.0, 9.999, 9.998, 9.99, 5.0, -8.0, -7.999, -7.998, -7.99, -6.0])
    return torch.cat([ends, torch.linspace(-2.0, 2.0, N - 10)]).double()


SPECTRA = {"negative_dominant": _negative_dominant, "clustered": _clustered}


@pytest.fixture(scope="module")
def matrices(spectra):
    return {name: (spectra.matrix(make(), seed=i), make()) for i, (name, make) in enumerate(SPECTRA.items())}


def _check_result(A, lam, r, k, which, tol):
    """Everything a converged EigenResult promises, against the known spectrum ``lam``."""
    norm = float(lam.abs().max())  # ||A||_2
    theta, V = r.eigenvalues, r.eigenvectors
    assert theta.shape == (k,) and V.shape == (A.shape[0], k) and r.residuals.shape == (k,)
    assert r.which == which
    assert bool(r.converged.all()), f"not converged: {r.residuals}"
    # sorted from most to least wanted
    key = KEYS[which](theta)
    assert bool((key[1:] >= key[:-1]).all()), f"not sorted for {which}: {theta.tolist()}"
    # the k most wanted eigenvalues: the error of a Ritz value is <= residual^2 / gap, with
    # residual <= tol ||A|| = 1e-9 and gaps >= 1e-3 here, i.e. far below 1e-8 relative.
    expected_keys = torch.sort(KEYS[which](lam)).values[:k]
    assert torch.allclose(key, expected_keys, rtol=0, atol=1e-8 * norm), (theta.tolist(), expected_keys.tolist())
    # each Ritz value is an eigenvalue (fixes the sign where magnitudes tie)
    assert float((theta[:, None] - lam[None]).abs().min(1).values.max()) <= 1e-8 * norm
    # reported residuals are the true ||A v - theta v||: the Lanczos relation A V = V T + f e^T holds
    # to O(eps ||A|| sqrt(ncv)) per cycle under full reorthogonalization, so 1e-10 ||A|| is ample
    explicit = (A @ V - V * theta).norm(dim=0)
    assert float((explicit - r.residuals).abs().max()) <= 1e-10 * norm
    assert float(r.residuals.max()) <= tol * norm  # the converged test, against the true ||A||
    # orthonormal Ritz vectors (full reorthogonalization: loss of orthogonality O(eps sqrt(ncv)))
    assert float((V.T @ V - torch.eye(k, dtype=V.dtype)).abs().max()) <= 1e-10
    # one Rayleigh-Ritz check per Lanczos step from step k on; the last one is what was returned
    assert len(r.residual_history) == r.num_matvecs - k + 1 and r.residual_history[-1] == tuple(r.residuals.tolist())


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_lanczos_top5_known_spectrum(name, which, matrices):
    A, lam = matrices[name]
    tol = 1e-10
    r = secondorder.eigenvalues(A, k=5, which=which, tol=tol, max_matvecs=3000, seed=0)
    assert r.method == "lanczos"
    _check_result(A, lam, r, 5, which, tol)


def test_negative_dominant_ordering(matrices):
    A, _ = matrices["negative_dominant"]
    largest = secondorder.eigenvalues(A, k=5, which="largest", seed=1).eigenvalues
    magnitude = secondorder.eigenvalues(A, k=5, which="magnitude", seed=1).eigenvalues
    smallest = secondorder.eigenvalues(A, k=2, which="smallest", seed=1).eigenvalues
    expected_largest = torch.tensor([3.0, 2.99, 1.0, 0.5, 0.5 - 1.0 / (N - 5)], dtype=torch.float64)
    assert torch.allclose(largest, expected_largest, rtol=1e-8, atol=0)
    assert torch.allclose(magnitude[:4], torch.tensor([-5.0, 3.0, 2.99, 1.0], dtype=torch.float64), rtol=1e-8, atol=0)
    assert abs(abs(float(magnitude[4])) - 0.5) <= 1e-8  # +0.5 and -0.5 tie in magnitude
    assert torch.allclose(smallest, torch.tensor([-5.0, -0.5], dtype=torch.float64), rtol=1e-8, atol=0)


@pytest.mark.parametrize(
    "name, which",
    [("clustered", "largest"), ("clustered", "smallest"), ("clustered", "magnitude"), ("negative_dominant", "largest")],
)
def test_lanczos_thick_restart(name, which, matrices):
    """ncv = 12 for k = 5: the basis is too small to converge in one cycle, so it must restart."""
    A, lam = matrices[name]
    tol = 1e-10
    r = secondorder.eigenvalues(A, k=5, which=which, tol=tol, ncv=12, max_matvecs=3000, seed=2)
    assert r.num_restarts > 0
    _check_result(A, lam, r, 5, which, tol)
    # one cycle fills the basis to ncv, each restart adds up to ncv - keep = 12 - 8 = 4 vectors,
    # and convergence is checked after every step, so it stops inside the last cycle
    assert 12 + 4 * (r.num_restarts - 1) < r.num_matvecs <= 12 + 4 * r.num_restarts


def test_breakdown_finds_repeated_eigenvalue(spectra):
    """Three distinct eigenvalues: the Krylov space is invariant after 3 steps, and the method must
    continue with fresh directions to find the multiplicity of the top eigenvalue."""
    lam = torch.tensor([-1.0] * 10 + [0.5] * 20 + [2.0] * 10, dtype=torch.float64)
    A = spectra.matrix(lam, seed=3)
    r = secondorder.eigenvalues(A, k=3, which="largest", seed=0)
    assert bool(r.converged.all())
    assert torch.allclose(r.eigenvalues, torch.full((3,), 2.0, dtype=torch.float64), rtol=0, atol=1e-10)
    V = r.eigenvectors
    assert float((V.T @ V - torch.eye(3, dtype=V.dtype)).abs().max()) <= 1e-10  # three independent vectors
    assert float((A @ V - 2.0 * V).norm(dim=0).max()) <= 1e-9
    assert bool(torch.isfinite(r.residuals).all())


@pytest.mark.parametrize("k", [3, 9])
def test_full_basis_on_small_matrix_is_exact(k, spectra):
    lam = torch.linspace(-2.0, 3.0, 10, dtype=torch.float64) + 0.01 * torch.arange(10.0, dtype=torch.float64) ** 2
    A = spectra.matrix(lam, seed=4)
    for which in KEYS:
        r = secondorder.eigenvalues(A, k=k, which=which, seed=0)  # ncv is capped at P = 10
        _check_result(A, lam, r, k, which, 1e-10)


# ---- power method ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def well_separated(spectra):
    lam = torch.cat([torch.tensor([10.0, 7.0, 5.0, -9.0, -6.0, -4.0]), torch.linspace(-1.0, 1.0, N - 6)]).double()
    return spectra.matrix(lam, seed=5), lam


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_power_matches_known_spectrum_and_lanczos(which, well_separated):
    A, lam = well_separated
    tol, norm = 1e-8, float(lam.abs().max())
    r = secondorder.eigenvalues(A, k=3, which=which, tol=tol, method="power", max_matvecs=3000, seed=0)
    assert r.method == "power"
    assert bool(r.converged.all())
    expected = lam[torch.sort(KEYS[which](lam)).indices[:3]]
    # Bauer-Fike: each eigenvalue estimate is within its residual <= tol ||A|| of an eigenvalue,
    # and the spectrum is separated by >= 1, so it is within tol ||A|| of the wanted one
    assert float((r.eigenvalues - expected).abs().max()) <= tol * norm
    explicit = (A @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
    assert float((explicit - r.residuals).abs().max()) <= 1e-10 * norm
    assert float(r.residuals.max()) <= tol * norm
    lanczos = secondorder.eigenvalues(A, k=3, which=which, seed=0)
    assert float((r.eigenvalues - lanczos.eigenvalues).abs().max()) <= tol * norm


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("budget", [12, 40, 120])
def test_power_stays_within_a_small_budget_and_improves_with_it(which, budget, well_separated):
    """A small budget used to be spent on a separate spectral-radius run (50 products) and the
    rest went negative: the answer was one product of a random block. Now the budget is the
    cap, and with a dominant top (or bottom) the estimate is already close."""
    A, lam = well_separated
    want = float(lam.max() if which == "largest" else lam.min())
    r = secondorder.eigenvalues(A, k=1, which=which, method="power", max_matvecs=budget, seed=0)
    assert r.num_matvecs <= budget
    # ratio 9/10 (the negative -9 against +10) converges slowly; the estimate still bounds from inside
    assert abs(float(r.eigenvalues[0]) - want) <= 0.4 * abs(want) * (12 / budget)


# ---- budgets and bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_tiny_budget_reports_unconverged(method, matrices):
    A, lam = matrices["negative_dominant"]
    r = secondorder.eigenvalues(A, k=5, which="smallest", method=method, max_matvecs=1, seed=0)
    assert not bool(r.converged.all())
    # the certificate stays honest: reported residuals are the true ones, and the unconverged pairs
    # have residuals above tol * (the norm estimate, itself >= every returned |theta|)
    explicit = (A @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
    assert float((explicit - r.residuals).abs().max()) <= 1e-10 * float(lam.abs().max())
    assert float(r.residuals[~r.converged].min()) > 1e-10 * float(r.eigenvalues.abs().max())
    assert bool(torch.isfinite(r.eigenvalues).all())


def test_bad_input(matrices):
    A, _ = matrices["clustered"]
    for k in (0, -1, N, N + 1):
        with pytest.raises(ValueError, match=rf"1 <= k < P = {N}"):
            secondorder.eigenvalues(A, k=k)
    with pytest.raises(ValueError, match="integer"):
        secondorder.eigenvalues(A, k=2.0)
    with pytest.raises(ValueError, match="which must be one of"):
        secondorder.eigenvalues(A, k=2, which="biggest")
    with pytest.raises(ValueError, match="method must be"):
        secondorder.eigenvalues(A, k=2, method="arnoldi")
    with pytest.raises(ValueError, match="tol must be a relative tolerance"):
        secondorder.eigenvalues(A, k=2, tol=0.0)
    with pytest.raises(ValueError, match="max_matvecs must be a positive integer"):
        secondorder.eigenvalues(A, k=2, max_matvecs=0)
    with pytest.raises(ValueError, match="ncv must exceed k"):
        secondorder.eigenvalues(A, k=5, ncv=5)
    with pytest.raises(ValueError, match="symmetric"):
        secondorder.eigenvalues(torch.triu(torch.ones(5, 5, dtype=torch.float64)), k=2)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_seed_reproducible_and_global_rng_untouched(method, well_separated, spectra):
    A, _ = well_separated
    state = torch.get_rng_state()
    a = secondorder.eigenvalues(A, k=2, method=method, tol=1e-6, seed=3)
    b = secondorder.eigenvalues(A, k=2, method=method, tol=1e-6, seed=3)
    g = secondorder.eigenvalues(A, k=2, method=method, tol=1e-6, seed=spectra.generator(3))
    secondorder.eigenvalues(A, k=2, method=method, tol=1e-6, seed=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert torch.equal(a.eigenvectors, g.eigenvectors)


# ---- repeated eigenvalues (issue 13) -----------------------------------------------------------


def _repeated_top(multiplicity: int) -> torch.Tensor:
    """A top eigenvalue 5.0 of the given multiplicity above 4.0, 3.5 and a bulk in [-1, 1]."""
    top = torch.tensor([5.0] * multiplicity + [4.0, 3.5], dtype=torch.float64)
    return torch.cat([top, torch.linspace(1.0, -1.0, N - multiplicity - 2, dtype=torch.float64)])


@pytest.mark.parametrize("multiplicity, k", [(3, 3), (3, 5), (4, 4), (4, 6), (6, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_lanczos_finds_every_copy_of_a_repeated_top(multiplicity, k, seed, spectra):
    """Single-vector Lanczos returned [5, 5, 4] for a triple 5 and certified it; the default block
    of k vectors holds every copy the wanted set needs."""
    A = spectra.matrix(_repeated_top(multiplicity), seed=10 + seed)
    exact = torch.linalg.eigh(A).eigenvalues.flip(0)[:k]  # dense float64 reference
    r = secondorder.eigenvalues(A, k=k, seed=seed)
    assert r.block_size == k and bool(r.converged.all())
    assert float((r.eigenvalues - exact).abs().max()) <= 1e-8 * 5.0
    V = r.eigenvectors
    assert float((V.T @ V - torch.eye(k, dtype=V.dtype)).abs().max()) <= 1e-10  # independent copies
    assert float((A @ V - V * r.eigenvalues).norm(dim=0).max()) <= 1e-9 * 5.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_default_widens_the_block_only_when_a_value_came_back_twice(seed, spectra):
    """A distinct top: the block of 2 certifies all of it (the same run as block_size=2, fewer
    products than a block of k); a triple top: the block of 2 finds two copies, so the default
    runs again from a block of k, and counts both runs' products."""
    simple = spectra.matrix(torch.cat([torch.tensor([6.0, 5.0, 4.5, 4.0, 3.5], dtype=torch.float64),
                                       torch.linspace(1.0, -1.0, N - 5, dtype=torch.float64)]), seed=40 + seed)
    r, two, k5 = (secondorder.eigenvalues(simple, k=5, seed=seed, block_size=b) for b in (None, 2, 5))
    assert r.block_size == 2 and bool(r.converged.all()) and r.num_matvecs == two.num_matvecs < k5.num_matvecs
    assert torch.equal(r.eigenvalues, two.eigenvalues)
    triple = spectra.matrix(_repeated_top(3), seed=50 + seed)
    r, two = (secondorder.eigenvalues(triple, k=5, seed=seed, block_size=b) for b in (None, 2))
    assert r.block_size == 5 and bool(r.converged.all()) and not bool(two.converged.all())
    assert r.num_matvecs > two.num_matvecs and r.num_restarts >= 1
    exact = torch.linalg.eigh(triple).eigenvalues.flip(0)[:5]  # dense float64 reference
    assert float((r.eigenvalues - exact).abs().max()) <= 1e-8 * 5.0


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_small_block_never_certifies_a_set_that_may_miss_copies(block_size, seed, spectra):
    """With block size b < multiplicity, a result may hold too few copies of 5.0; every pair it
    reports as converged must then be a correct top eigenvalue (the rest are marked unconverged)."""
    A = spectra.matrix(_repeated_top(4), seed=20 + seed)
    exact = torch.linalg.eigh(A).eigenvalues.flip(0)[:5]
    r = secondorder.eigenvalues(A, k=5, seed=seed, block_size=block_size, ncv=40)
    assert r.block_size == block_size
    good = (r.eigenvalues - exact).abs() <= 1e-8 * 5.0
    assert bool(good[r.converged].all()), (r.eigenvalues.tolist(), r.converged.tolist())
    assert not bool(r.converged.all()) or bool(good.all())
    assert bool(r.converged[0])  # the top value itself is certified by its residual


def test_block_size_is_checked(matrices):
    A, _ = matrices["clustered"]
    for b in (0, 4, 2.0):
        with pytest.raises(ValueError, match="block_size must be an integer"):
            secondorder.eigenvalues(A, k=3, block_size=b)
    with pytest.raises(ValueError, match="power method iterates a block of k"):
        secondorder.eigenvalues(A, k=3, method="power", block_size=1)
