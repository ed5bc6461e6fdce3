"""Shared helpers for the linalg tests: dense float64 matrices with known spectra.

Every random quantity comes from an explicit ``torch.Generator``; the autouse fixture
``global_rng_untouched`` checks after every test in this directory that neither the tests
nor the library touched torch's global RNG.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pytest
import torch
from torch import Tensor

DTYPE = torch.float64


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (the tests never use the global RNG)."""
    return torch.Generator().manual_seed(seed)


def random_orthogonal(n: int, seed: int) -> Tensor:
    """Haar-distributed orthogonal ``[n, n]`` matrix: QR of a Gaussian matrix with sign-fixed R."""
    G = torch.randn(n, n, generator=generator(seed), dtype=DTYPE)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R))


def matrix_with_spectrum(lam: Sequence[float] | Tensor, seed: int = 0) -> Tensor:
    """``A = Q diag(lam) Q^T`` with a seeded random orthogonal ``Q``, symmetrized exactly."""
    lam = torch.as_tensor(lam, dtype=DTYPE)
    Q = random_orthogonal(lam.numel(), seed)
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def eigvecs_with_spectrum(lam: Sequence[float] | Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(A, Q)``: the matrix of :func:`matrix_with_spectrum` and its eigenvectors (columns of ``Q``)."""
    lam = torch.as_tensor(lam, dtype=DTYPE)
    Q = random_orthogonal(lam.numel(), seed)
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, Q


def z_score(samples: Tensor, exact: Tensor | float) -> Tensor:
    """``(mean - exact) / SEM`` along dim 0, with the SEM from the spread of the samples.

    For an unbiased estimator and ``S`` independent seeds this is approximately standard normal
    (CLT; Student t with ``S - 1`` dof), so ``|z| > 4`` has probability about 6e-5.
    """
    samples = samples.double()
    S = samples.shape[0]
    sem = samples.std(dim=0) / math.sqrt(S)
    return (samples.mean(dim=0) - exact) / sem


class Spectra:
    """Namespace handed to tests through the ``spectra`` fixture."""

    generator: Callable[[int], torch.Generator] = staticmethod(generator)
    matrix: Callable[..., Tensor] = staticmethod(matrix_with_spectrum)
    eig: Callable[..., tuple[Tensor, Tensor]] = staticmethod(eigvecs_with_spectrum)
    z_score: Callable[[Tensor, Tensor | float], Tensor] = staticmethod(z_score)
    dtype = DTYPE


@pytest.fixture(scope="session")
def spectra() -> type[Spectra]:
    return Spectra


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The matrices here are tiny (P <= 300): intra-op threads only add synchronization, and on a
    shared 2-core machine a busy neighbour makes every threaded op wait (the suite took 3-10x
    longer). Restored after each module, so tests elsewhere keep their settings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def global_rng_untouched():
    """Every algorithm draws from its own generator: torch's global RNG state must not move."""
    before = torch.get_rng_state()
    yield
    assert torch.equal(torch.get_rng_state(), before), "torch's global RNG state changed during the test"
