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

from secondorder.linalg.probes import Seed, make_generator, rademacher
from secondorder.linalg.progress import ticking
from secondorder.linalg.results import SpectralDensityResult
from secondorder.operators.base import LinearOperator, working_operator
from secondorder.validation import positive_int


def spectral_density(
    A: LinearOperator | Tensor,
    num_probes: int = 1,
    num_steps: int = 100,
    seed: Seed = None,
    reorthogonalize: bool = True,
    progress: bool = False,
) -> SpectralDensityResult:
    """Stochastic Lanczos quadrature of a symmetric operator.

    Args:
        A: a symmetric operator or dense tensor.
        num_probes: independent start vectors (their products are batched).
        num_steps: Lanczos steps per probe, capped at ``P``.
        seed: int, generator or ``None``.
        reorthogonalize: full reorthogonalization (default; memory ``num_probes * steps * P``).
        progress: show a progress bar of the products on stderr.

    Returns:
        :class:`SpectralDensityResult` with real ``nodes`` and ``weights`` (rows sum to 1).

    """
    A = working_operator(A)
    positive_int(num_probes, "num_probes")
    positive_int(num_steps, "num_steps")
    P = A.shape[0]
    m = min(num_steps, P)
    gen = make_generator(seed, A)
    with ticking(A, progress, num_probes * m, "spectral density (SLQ)") as op, torch.no_grad():
        nodes, weights, used = _lanczos_quadrature(op, num_probes, m, gen, reorthogonalize)
    return SpectralDensityResult(nodes=nodes, weights=weights, dimension=P, num_matvecs=used)


def _lanczos_quadrature(A: LinearOperator, num_probes: int, m: int, gen, reorthogonalize: bool):
    """``num_probes`` Lanczos runs of ``m`` steps advanced together: Gauss nodes, weights, products used."""
    P = A.shape[0]
    eps = torch.finfo(A.dtype).eps
    start = A.num_matvecs
    v = rademacher(A, num_probes, gen) / P**0.5
    basis = [v]
    alphas, betas = [], []
    length = torch.full((num_probes,), m, dtype=torch.long)
    active = torch.ones(num_probes, dtype=torch.bool)
    prev, beta_prev = torch.zeros_like(v), torch.zeros(num_probes, dtype=A.dtype, device=A.device)
    scale = torch.zeros(num_probes, dtype=torch.float64)
    for j in range(m):
        cols = active.nonzero().flatten().to(A.device)
        w = torch.zeros_like(v)
        w[:, cols] = A @ v[:, cols]
        alpha = (v * w).sum(0)
        w = w - alpha * v - beta_prev * prev
        if reorthogonalize:
            B = torch.stack(basis)  # [j+1, P, R]
            for _ in range(2):
                w = w - torch.einsum("jpr,jr->pr", B, torch.einsum("jpr,pr->jr", B, w))
        beta = w.norm(dim=0)
        alphas.append(alpha)
        scale = torch.maximum(scale, alpha.abs().double().cpu() + beta.double().cpu())
        broke = active & (beta.double().cpu() <= 100 * eps * scale.clamp_min(1e-300))
        if j == m - 1:
            break
        length[broke] = j + 1
        active &= ~broke
        beta = torch.where(active.to(A.device), beta, torch.zeros_like(beta))
        betas.append(beta)
        if not bool(active.any()):
            break
        prev, v = v, w / torch.where(beta > 0, beta, torch.ones_like(beta))
        beta_prev = beta
        basis.append(v)
    steps = len(alphas)
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    a = torch.stack(alphas).double().cpu()
    b = torch.stack(betas).double().cpu() if betas else torch.zeros(0, num_probes, dtype=torch.float64)
    for r in range(num_probes):
        L = min(int(length[r]), steps)
        T = torch.diag(a[:L, r]) + torch.diag(b[: L - 1, r], 1) + torch.diag(b[: L - 1, r], -1)
        theta, S = torch.linalg.eigh(T)
        nodes[r, :L] = theta
        weights[r, :L] = S[0] ** 2
    return nodes, weights, A.num_matvecs - start
