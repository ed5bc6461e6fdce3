r"""Randomized trace estimation, total and per block, with standard errors.

* **Hutchinson** (Hutchinson 1989): :math:`\mathrm{tr}(A) \approx \frac1m\sum_i z_i^\top A z_i` with
  Rademacher :math:`z_i`; unbiased, variance :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)/m`.
* **Hutch++** (Meyer, Musco, Musco, Woodruff 2021): sketch :math:`Q = \mathrm{orth}(AS)` with
  :math:`m/3` probes, take :math:`\mathrm{tr}(Q^\top A Q)` exactly and Hutchinson on the deflated
  :math:`(I-QQ^\top)A(I-QQ^\top)`; error :math:`O(1/m)` instead of :math:`O(1/\sqrt m)` on decaying spectra.
* **XTrace** (Epperly, Tropp, Webber 2024): exchangeable leave-one-out version of Hutch++ using
  :math:`m/2` probes for both roles; the standard error comes from the spread of the
  leave-one-out estimates.

Per-block traces :math:`\mathrm{tr}(A_{bb}) = \mathrm{tr}(P_b A)` use the same probes: every
estimator above is a sum over coordinates, and restricting that sum to a block's coordinates
keeps it unbiased for the block (for Hutch++ and XTrace:
:math:`\mathrm{tr}(P_bA) = \mathrm{tr}(P_bA\Pi) + \mathrm{tr}(P_bA(I-\Pi))`, the first exact from
:math:`AQ`, the second by projected probes). Block values sum to the total.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder.linalg.probes import Seed, chunk_sizes, rademacher, run_estimator
from secondorder.linalg.results import BlockTrace, TraceResult
from secondorder.linalg.sketch import leave_one_out_sketch
from secondorder.operators.base import LinearOperator, block_sums


def _summarize(exact: Tensor, samples: Tensor) -> tuple[Tensor, Tensor]:
    """Per block: ``exact + mean(samples)`` and the standard error of the mean (``[nb]`` each)."""
    n = samples.shape[1]
    stderr = samples.std(dim=1) / math.sqrt(n) if n > 1 else torch.full_like(exact, math.inf)
    return exact + samples.mean(dim=1), stderr


def _hutchinson(A: LinearOperator, m: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    samples = []
    for k in chunk_sizes(A, m):  # stream chunks of int8 probes, reduced as they are multiplied
        samples.append(A.quadratic_forms(rademacher(A, k, gen, compact=True)))
    samples_ = torch.cat(samples, dim=1)
    return torch.zeros(len(A.blocks), dtype=A.dtype, device=A.device), samples_


def _project_out(Q: Tensor, X: Tensor) -> Tensor:
    return X - Q @ (Q.T @ X)


def _hutchpp(A: LinearOperator, m: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    s = m // 3
    Q, _ = torch.linalg.qr(A @ rademacher(A, s, gen))
    exact = block_sums(Q * (A @ Q), A.blocks).sum(dim=1)
    G = _project_out(Q, rademacher(A, m - 2 * s, gen))
    return exact, A.quadratic_forms(G)


def _xtrace(A: LinearOperator, m: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    sk = leave_one_out_sketch(A, m // 2, gen, "XTrace")
    Q, Z, S = sk.Q, sk.Z, sk.S
    C = Q.T @ sk.Omega
    C_loo = C - S * (S * C).sum(0, keepdim=True)  # column i: (I - s_i s_i^T) Q^T w_i
    W = sk.Omega - Q @ C_loo  # (I - Pi_i) w_i
    AW = sk.Y - Z @ C_loo
    M = torch.stack([Q[b.start : b.stop].T @ Z[b.start : b.stop] for b in A.blocks])  # Q^T P_b A Q
    exact = M.diagonal(dim1=1, dim2=2).sum(-1)
    samples = block_sums(W * AW, A.blocks) - torch.einsum("ki,bkl,li->bi", S, M, S)
    return exact, samples


_METHODS = {"hutchinson": (_hutchinson, 1), "hutch++": (_hutchpp, 3), "xtrace": (_xtrace, 4)}


def trace(
    A: LinearOperator | Tensor, num_matvecs: int, method: str = "hutch++", seed: Seed = None, progress: bool = False
) -> TraceResult:
    """Estimate ``tr(A)`` and the trace of every diagonal block with ``num_matvecs`` products.

    Args:
        A: a symmetric operator (e.g. :class:`~secondorder.HessianOperator`) or dense tensor.
        num_matvecs: the budget of matrix-vector products (Hutch++ >= 3, XTrace >= 4).
        method: ``"hutch++"`` (default), ``"hutchinson"`` or ``"xtrace"``.
        seed: an int, a ``torch.Generator`` or ``None`` (fresh entropy); the global RNG is untouched.
        progress: show a progress bar of the products on stderr.

    Returns:
        :class:`TraceResult` with ``value``, ``stderr``, ``dof``, ``num_matvecs`` and ``blocks``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> r = trace(A, 60, method="hutch++", seed=0)
        >>> abs(r.value - 5050) < 4 * r.stderr
        True
    """
    A, (exact, samples), used = run_estimator(A, num_matvecs, method, _METHODS, seed, "trace", progress)
    values, stderrs = _summarize(exact, samples)
    total, total_stderr = _summarize(exact.sum(0, keepdim=True), samples.sum(0, keepdim=True))
    blocks = tuple(
        BlockTrace(b.name, b.size, float(v), float(e)) for b, v, e in zip(A.blocks, values.tolist(), stderrs.tolist())
    )
    return TraceResult(
        value=float(total), stderr=float(total_stderr), num_matvecs=used, method=method,
        dof=samples.shape[1] - 1, blocks=blocks,
    )
