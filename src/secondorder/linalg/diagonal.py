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

from secondorder.linalg.probes import Seed, chunk_sizes, rademacher, run_estimator, with_probe_chunk
from secondorder.linalg.results import DiagonalResult
from secondorder.linalg.sketch import LeaveOneOutSketch, LeaveTwoOut, leave_one_out_sketch, with_covariance
from secondorder.operators.base import LinearOperator


def _hutchinson(A: LinearOperator, m: int, gen: torch.Generator, probe_chunk: int | None = None) -> Tensor:
    # streamed mean and centred sum of squares, merged per chunk (Chan, Golub, LeVeque 1979): the
    # one-pass sum(S^2) - m mean^2 cancels catastrophically when the spread is small next to diag(A)
    mean = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    m2 = torch.zeros_like(mean)
    count = 0
    for k in chunk_sizes(m, probe_chunk):
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
    sk = leave_one_out_sketch(A, m // 2, gen, "XDiag")
    Q, Z, S = sk.Q, sk.Z, sk.S
    projected = (Q * Z).sum(1, keepdim=True) - (Q @ S) * (Z @ S)  # diag(Pi_i A), one column per i
    R_loo = sk.R - S * (S * sk.R).sum(0, keepdim=True)  # Q^T-coefficients of Pi_i A w_i
    estimates = projected + sk.Omega * (sk.Y - Q @ R_loo)
    n = S.shape[1]
    stderr = with_covariance(estimates.std(1) / math.sqrt(n), _pair_covariance(sk) / (n * (n - 1)))
    return torch.stack([estimates.mean(1), stderr], dim=1)


def _pair_covariance(sk: LeaveOneOutSketch) -> Tensor:
    r""":math:`\sum_{i \ne j} D_{ij} \odot D_{ji}` ``[P]`` with :math:`D_{ij} = d_i - d_i^{(-j)}`, the
    i-th XDiag sample minus the one whose sketch also leaves out probe ``j`` (no products).

    :math:`\Pi_i - \Pi_{ij} = Qu_{ij}u_{ij}^\top Q^\top` (see :mod:`~secondorder.linalg.sketch`) gives
    :math:`D_{ij} = Qu_{ij} \odot (Zu_{ij} - (u_{ij}^\top R e_i)\,\omega_i)`. One probe ``j`` at a time:
    ``O(P m)`` memory.
    """
    pairs = LeaveTwoOut.of(sk.S)
    QS, ZS = sk.Q @ sk.S, sk.Z @ sk.S
    tau = pairs.along(sk.S.T @ sk.R)  # [i, j] = u_ij^T Q^T A w_i

    def differences(i: Tensor, j: Tensor) -> Tensor:  # columns D_{i[k], j[k]}
        rho, nu = pairs.rho[i, j], pairs.nu[i, j]
        Qu = (QS[:, j] - rho * QS[:, i]) / nu
        return Qu * ((ZS[:, j] - rho * ZS[:, i]) / nu - tau[i, j] * sk.Omega[:, i])

    total = torch.zeros_like(QS[:, 0])
    everyone = torch.arange(QS.shape[1], device=QS.device)
    for j in everyone:
        others, this = everyone[everyone != j], j.expand(QS.shape[1] - 1)
        total += (differences(others, this) * differences(this, others)).sum(1)
    return total


_METHODS = {"hutchinson": (_hutchinson, 1), "xdiag": (_xdiag, 4)}


def diagonal(
    A: LinearOperator | Tensor, num_matvecs: int, method: str = "hutchinson", seed: Seed = None, progress: bool = False,
    *, probe_chunk: int | None = None,
) -> DiagonalResult:
    """Estimate ``diag(A)`` with ``num_matvecs`` products.

    Args:
        A: a symmetric operator or dense tensor.
        num_matvecs: the budget (XDiag needs >= 4).
        method: ``"hutchinson"`` (default) or ``"xdiag"``.
        seed: an int, a ``torch.Generator`` or ``None``.
        progress: show a progress bar of the products on stderr.
        probe_chunk: Hutchinson draws and multiplies this many probes at a time (all at once for
            ``None``), bounding the probe memory; the result is the same. (Formerly the
            operator's ``chunk_size``, which now only bounds its vectorized products.)

    Returns:
        :class:`DiagonalResult` with ``value`` ``[P]`` and per-entry ``stderr`` ``[P]``.

    """
    methods = with_probe_chunk(_METHODS, "hutchinson", probe_chunk)
    _, out, used = run_estimator(A, num_matvecs, method, methods, seed, "diagonal", progress)
    return DiagonalResult(value=out[:, 0], stderr=out[:, 1], num_matvecs=used, method=method)
