r"""Spectral density by stochastic Lanczos quadrature (Golub & Meurant; Ubaru, Chen, Saad 2017;
Ghorbani, Krishnan, Xiao 2019; Yao et al. 2020, PyHessian).

For each of ``num_probes`` normalized Rademacher start vectors :math:`v`, ``num_steps`` Lanczos
steps give a tridiagonal :math:`T = S\Theta S^\top`; the Gauss quadrature nodes are the Ritz values
:math:`\theta_j` and the weights :math:`w_j = S_{1j}^2`, so that
:math:`v^\top f(A) v \approx \sum_j w_j f(\theta_j)`. All probes advance together: each Lanczos
step is one batched product with ``num_probes`` columns. Steps are capped at ``P``; a probe whose
Krylov space becomes invariant (breakdown) stops there, with exact quadrature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.linalg.lanczos import Lanczos
from secondorder.linalg.probes import Seed, chunk_sizes, make_generator, rademacher
from secondorder.linalg.progress import ticking
from secondorder.linalg.results import SpectralDensityResult
from secondorder.operators.base import LinearOperator, working_operator
from secondorder.validation import optional_positive_int, positive_int


def spectral_density(
    A: LinearOperator | Tensor,
    num_probes: int = 1,
    num_steps: int = 100,
    seed: Seed = None,
    reorthogonalize: bool = True,
    progress: bool = False,
    *,
    probe_chunk: int | None = None,
    memory_budget: int | None = None,
) -> SpectralDensityResult:
    """Stochastic Lanczos quadrature of a symmetric operator.

    Args:
        A: a symmetric operator or dense tensor.
        num_probes: independent start vectors (the products of a chunk of them are batched).
        num_steps: Lanczos steps per probe, capped at ``P``.
        seed: int, generator or ``None``.
        reorthogonalize: full reorthogonalization against every earlier Lanczos vector (default:
            the Ritz values are those of exact arithmetic; the basis takes ``chunk * (steps + 3) * P``
            numbers). ``False`` keeps four vectors per probe (``4 * chunk * P``): rounding then
            lets converged Ritz values reappear as spurious copies ("ghosts", Paige 1971), which
            split the weight of their eigenvalue between the copies; integrals of smooth
            functions of the density (traces, moments, the density smoothed by a kernel) stay
            accurate (Knizhnerman 1996; Meurant & Strakos 2006), single nodes and their weights
            do not.
        progress: show a progress bar of the products on stderr.
        probe_chunk: run the probes this many at a time (all at once for ``None``); the result
            is the same, the peak memory is that of one chunk.
        memory_budget: bytes the Lanczos vectors may take; chooses the largest ``probe_chunk``
            that fits (``ValueError`` if one probe does not: use ``reorthogonalize=False`` or
            fewer steps). Not with ``probe_chunk``.

    Returns:
        :class:`SpectralDensityResult` with real ``nodes`` and ``weights`` (rows sum to 1).

    """
    A = working_operator(A)
    positive_int(num_probes, "num_probes")
    positive_int(num_steps, "num_steps")
    P = A.shape[0]
    m = min(num_steps, P)
    chunk = _chunk(num_probes, m, P, A.dtype, reorthogonalize, probe_chunk, memory_budget)
    gen = make_generator(seed, A)
    with ticking(A, progress, num_probes * m, "spectral density (SLQ)") as op, torch.no_grad():
        start = op.num_matvecs
        parts = [_lanczos_quadrature(op, k, m, gen, reorthogonalize) for k in chunk_sizes(num_probes, chunk)]
        used = op.num_matvecs - start
    nodes, weights = (torch.cat([part[i] for part in parts]) for i in (0, 1))
    return SpectralDensityResult(nodes=nodes, weights=weights, dimension=P, num_matvecs=used)


def lanczos_vectors(m: int, P: int, reorthogonalize: bool) -> int:
    """How many numbers one probe's Lanczos vectors take: the ``m``-step basis and three working
    vectors, or four vectors without reorthogonalization (the operator's own memory aside).
    """
    return (m + 3) * P if reorthogonalize else 4 * P


def _chunk(num_probes: int, m: int, P: int, dtype: torch.dtype, reorthogonalize: bool, probe_chunk: int | None,
           memory_budget: int | None) -> int | None:
    """The probes run at once: ``probe_chunk``, or what ``memory_budget`` bytes hold."""
    optional_positive_int(probe_chunk, "probe_chunk (probes run at once)")
    if memory_budget is None:
        return probe_chunk
    if probe_chunk is not None:
        raise ValueError("pass probe_chunk or memory_budget, not both")
    per_probe = lanczos_vectors(m, P, reorthogonalize) * torch.finfo(dtype).bits // 8
    fits = positive_int(memory_budget, "memory_budget (bytes)") // per_probe
    if fits < 1:
        raise ValueError(f"one probe's Lanczos vectors take {per_probe} bytes ({m} steps of {P} coordinates), above "
                         f"memory_budget={memory_budget}; raise it, take fewer steps or pass reorthogonalize=False")
    return min(num_probes, fits)


def _lanczos_quadrature(A: LinearOperator, num_probes: int, m: int, gen, reorthogonalize: bool):
    """``num_probes`` Lanczos runs of ``m`` steps advanced together: Gauss nodes, weights, products used."""
    P = A.shape[0]
    start = A.num_matvecs
    run = Lanczos(A, rademacher(A, num_probes, gen) / P**0.5, m, reorthogonalize)
    for _ in run:
        pass
    steps = len(run.alphas)
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    for r in range(num_probes):
        theta, S = torch.linalg.eigh(run.tridiagonal(r, min(int(run.length[r]), steps)))
        L = theta.numel()
        nodes[r, :L] = theta
        weights[r, :L] = S[0] ** 2
    return nodes, weights, A.num_matvecs - start
