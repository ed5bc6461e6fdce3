r"""Randomized diagonal estimation with per-entry standard errors.

* **Hutchinson** (Bekas, Kokiopoulou, Saad 2007): :math:`\mathrm{diag}(A) \approx \frac1m\sum_i z_i \odot Az_i`
  with Rademacher :math:`z_i`; unbiased, entry variance :math:`\sum_{j\ne i} A_{ij}^2 / m`.
* **XDiag** (Epperly, Tropp, Webber 2024): with :math:`Y = A\Omega`, :math:`Q = \mathrm{orth}(Y)` and
  :math:`\Pi_i` the projector on the columns of :math:`Y` other than :math:`i`,
  :math:`\mathrm{diag}(A) \approx \frac{2}{m}\sum_i \mathrm{diag}(\Pi_i A) + \omega_i\odot(I-\Pi_i)A\omega_i`;
  exact on rank :math:`< m/2` matrices and far more accurate on decaying spectra.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.linalg.probes import Seed, check_budget, chunk_sizes, make_generator, rademacher
from secondorder.linalg.results import DiagonalResult
from secondorder.operators.base import LinearOperator, as_operator


def _hutchinson(A: LinearOperator, m: int, gen: torch.Generator) -> Tensor:
    # streamed mean and centred sum of squares, merged per chunk (Chan, Golub, LeVeque 1979): the
    # one-pass sum(S^2) - m mean^2 cancels catastrophically when the spread is small next to diag(A)
    mean = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    m2 = torch.zeros_like(mean)
    count = 0
    for k in chunk_sizes(A, m):
        Z = rademacher(A, k, gen)
        S = Z * (A @ Z)
        chunk_mean = S.mean(1)
        delta = chunk_mean - mean
        m2 += ((S - chunk_mean[:, None]) ** 2).sum(1) + delta**2 * (count * k / (count + k))
        mean += delta * (k / (count + k))
        count += k
    var = m2 / (m - 1) if m > 1 else torch.full_like(mean, math.inf)  # one sample: no error bar
    return torch.stack([mean, (var / m).sqrt()], dim=1)


def _xdiag(A: LinearOperator, m: int, gen: torch.Generator) -> Tensor:
    s = m // 2
    Omega = rademacher(A, s, gen)
    Y = A @ Omega
    Q, R = torch.linalg.qr(Y)
    Z = A @ Q
    S = torch.linalg.solve_triangular(R, torch.eye(s, dtype=R.dtype, device=R.device), upper=True).T
    if not torch.isfinite(S).all():
        raise ValueError("XDiag's sketch is rank deficient (rank < num_matvecs/2); use method='hutchinson'")
    S = S / S.norm(dim=0, keepdim=True)
    projected = (Q * Z).sum(1, keepdim=True) - (Q @ S) * (Z @ S)  # diag(Pi_i A), one column per i
    R_loo = R - S * (S * R).sum(0, keepdim=True)  # Q^T-coefficients of Pi_i A w_i
    estimates = projected + Omega * (Y - Q @ R_loo)
    return torch.stack([estimates.mean(1), estimates.std(1) / math.sqrt(s)], dim=1)


_METHODS = {"hutchinson": (_hutchinson, 1), "xdiag": (_xdiag, 4)}


def diagonal(A: LinearOperator | Tensor, num_matvecs: int, method: str = "hutchinson", seed: Seed = None) -> DiagonalResult:
    """Estimate ``diag(A)`` with ``num_matvecs`` products.

    Args:
        A: a symmetric operator or dense tensor.
        num_matvecs: the budget (XDiag needs >= 4).
        method: ``"hutchinson"`` (default; streams probes in the operator's ``chunk_size``) or ``"xdiag"``.
        seed: an int, a ``torch.Generator`` or ``None``.

    Returns:
        :class:`DiagonalResult` with ``value`` ``[P]`` and per-entry ``stderr`` ``[P]``.
    """
    A = as_operator(A)
    if method not in _METHODS:
        raise ValueError(f"unknown diagonal method {method!r}; choose one of {sorted(_METHODS)}")
    estimator, minimum = _METHODS[method]
    check_budget(num_matvecs, minimum, method)
    gen = make_generator(seed, A.device)
    start = A.num_matvecs
    with torch.no_grad():
        out = estimator(A, num_matvecs, gen)
    return DiagonalResult(value=out[:, 0], stderr=out[:, 1], num_matvecs=A.num_matvecs - start, method=method)
