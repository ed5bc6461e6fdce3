"""block_eigenvalues in lockstep: every block's Lanczos shares one [P, L] product per round."""

from __future__ import annotations

import pytest
import torch

import secondorder
from secondorder.operators.base import Block, DenseOperator


class CountingDense(DenseOperator):
    """A dense operator that counts its product calls (a curvature operator's data passes)."""

    calls = 0

    def _matmat(self, V):
        self.calls += 1
        return super()._matmat(V)


def _coupled(spectra) -> tuple[torch.Tensor, list[Block], dict[str, torch.Tensor]]:
    """Diagonal blocks with known spectra (one with a triple top, one small), coupled by
    off-diagonal blocks that a block's products must ignore."""
    spectra_of = {
        "a": torch.cat([torch.tensor([6.0, 4.0, 3.9]), torch.linspace(2.0, -2.0, 117)]),
        "small": torch.linspace(-1.0, 1.5, 12),
        "c": torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.5]), torch.linspace(1.0, -3.0, 156)]),
    }
    blocks, start = [], 0
    for name, lam in spectra_of.items():
        blocks.append(Block(name, start, start + lam.numel()))
        start += lam.numel()
    G = torch.randn(start, start, generator=spectra.generator(7), dtype=torch.float64)
    M = 0.3 * (G + G.T)  # the coupling
    for i, b in enumerate(blocks):
        M[b.start : b.stop, b.start : b.stop] = spectra.matrix(spectra_of[b.name].double(), seed=30 + i)
    return M, blocks, spectra_of


@pytest.mark.parametrize("k, which", [(1, "largest"), (3, "largest"), (2, "smallest")])
def test_lockstep_matches_dense_blocks_and_the_per_block_runs(k, which, spectra):
    M, blocks, _ = _coupled(spectra)
    A = CountingDense(M, blocks)
    results = secondorder.block_eigenvalues(A, k=k, which=which, seed=0)
    sign = -1.0 if which == "largest" else 1.0
    lanczos_rounds = []
    for b in blocks:
        r = results[b.name]
        exact = torch.linalg.eigh(M[b.start : b.stop, b.start : b.stop]).eigenvalues  # dense float64 reference
        exact = exact[torch.argsort(sign * exact)][:k]
        assert bool(r.converged.all())
        assert float((r.eigenvalues - exact).abs().max()) <= 1e-8 * float(exact.abs().max())
        alone = A.block(b.name)
        if r.method == "dense":
            assert r.num_matvecs == b.size
            continue
        lanczos_rounds.append(r.num_matvecs)
        one = secondorder.eigenvalues(alone, k, which, seed=0)  # what block_eigenvalues did before
        # the same start and products up to rounding (a wider matmul): the same steps, give or take
        # a few where rounding moves the step a residual first passes tol
        assert abs(one.num_matvecs - r.num_matvecs) <= 0.05 * one.num_matvecs
        assert float((one.eigenvalues - r.eigenvalues).abs().max()) <= 1e-10 * float(exact.abs().max())
    # one product per round: as many as the slowest block's steps, not their sum
    A.calls, A.num_matvecs = 0, 0
    results = secondorder.block_eigenvalues(A, k=k, which=which, seed=0)
    assert A.calls == max(lanczos_rounds) and len(lanczos_rounds) == 2
    assert A.num_matvecs == sum(r.num_matvecs for r in results.values())


def test_lockstep_finds_the_triple_top_of_a_block(spectra):
    M, blocks, _ = _coupled(spectra)
    r = secondorder.block_eigenvalues(DenseOperator(M, blocks), k=3, seed=1)["c"]
    assert r.block_size == 3 and bool(r.converged.all())
    assert torch.allclose(r.eigenvalues, torch.full((3,), 5.0, dtype=torch.float64), rtol=0, atol=1e-8)


def test_lockstep_budget_and_power_method(spectra):
    M, blocks, _ = _coupled(spectra)
    A = DenseOperator(M, blocks)
    tight = secondorder.block_eigenvalues(A, k=2, seed=0, max_matvecs=6)
    assert all(tight[n].num_matvecs <= 6 and not bool(tight[n].converged.all()) for n in ("a", "c"))
    power = secondorder.block_eigenvalues(A, k=1, seed=0, method="power", tol=1e-8, max_matvecs=3000)
    for b in blocks:
        exact = torch.linalg.eigvalsh(M[b.start : b.stop, b.start : b.stop]).max()
        assert bool(power[b.name].converged.all())
        assert abs(float(power[b.name].eigenvalues[0]) - float(exact)) <= 1e-8 * float(exact.abs())
