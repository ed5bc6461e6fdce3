r"""Local Newton directions of q machines and the ways to combine them.

Machine k holds :math:`\hat H_k = \tilde A_k^\top\tilde A_k + \lambda_k I` and solves
:math:`\hat p_k = \hat H_k^{-1} g` (batched Cholesky on [q, d, d]). Combiners:

* uniform averaging (GIANT): :math:`\bar p = \frac1q\sum_k \hat p_k`. Because
  :math:`E[\hat H^{-1}] \succ H^{-1}` it converges to a wrong, too long step as q grows
  (bias floor about d/m).
* determinantal averaging (Dereziński & Mahoney, NeurIPS'19):
  :math:`\bar p = \sum_k a_k\hat p_k/\sum_k a_k` with :math:`a_k = \det\hat H_k`, computed as
  :math:`a_k = \exp(\log\det\hat H_k - \max_j\log\det\hat H_j)`. Consistent as q → ∞ for
  independent (Poisson/Bernoulli) row sampling, by :math:`E[\det(\hat H)\hat H^{-1}] = E[\det\hat H]\,H^{-1}`.
* scaled regularization (Dereziński, Bartan, Pilanci & Mahoney, NeurIPS'20): solve locally with
  :math:`\lambda' = \lambda(1 - d_\lambda/m)` and multiply the combined step by
  :math:`(1 - d_\lambda/m)`; exact for surrogate sketches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from secondorder.newton.problems import DTYPE, check_lam
from secondorder.newton.sketches import RowSketch
from secondorder.validation import positive_int

AVERAGING = ("uniform", "determinantal")


@dataclass(frozen=True)
class ScaledRegularization:
    r"""Local regularizer :math:`\lambda' = \lambda\gamma` and step scale :math:`\gamma = 1 - d_\lambda/m`."""

    local_lam: float
    step_scale: float


def scaled_regularization(lam: float, effective_dim: float, m: int) -> ScaledRegularization:
    r""":math:`\lambda' = \lambda(1 - d_\lambda/m)`, step scale :math:`1 - d_\lambda/m`; needs m > d_λ.

    ``lam`` is the global regularizer, ``effective_dim`` the :math:`d_\lambda` of the loss-part
    Hessian at the current iterate, ``m`` the per-machine sketch size.
    """
    lam = check_lam(lam)
    if not (effective_dim >= 0 and m > effective_dim):
        raise ValueError(
            f"scaled regularization needs 0 <= d_lambda < m, got d_lambda={effective_dim}, m={m}; "
            "increase the sketch size"
        )
    gamma = 1.0 - effective_dim / m
    return ScaledRegularization(lam * gamma, gamma)


@dataclass(frozen=True)
class LocalSolves:
    """Per-machine directions ``directions`` [q, d] and ``logdets`` [q] of their Ĥ_k."""

    directions: Tensor
    logdets: Tensor


def stacked_rows(sketches: Sequence[RowSketch]) -> Tensor:
    """The machines' sketched rows as one zero-padded [q, r, d] tensor (padding rows are zero,
    which leaves every Gram matrix and product unchanged).
    """
    if len(sketches) == 0:
        raise ValueError("need at least one sketch (q >= 1)")
    d = sketches[0].rows.shape[1]
    r = max(s.rows.shape[0] for s in sketches)
    rows = torch.zeros(len(sketches), r, d, dtype=DTYPE)
    for k, s in enumerate(sketches):
        rows[k, : s.rows.shape[0]] = s.rows
    return rows


def sketched_hessians(sketches: Sequence[RowSketch], local_lam: float) -> Tensor:
    r"""Stack :math:`\hat H_k = \tilde A_k^\top\tilde A_k + \lambda' I` into [q, d, d]
    (one batched product over :func:`stacked_rows`).
    """
    local_lam = check_lam(local_lam)
    rows = stacked_rows(sketches)
    return rows.mT @ rows + local_lam * torch.eye(rows.shape[2], dtype=DTYPE)


def local_directions_cg(rows: Tensor, local_lam: float, gradient: Tensor, iterations: int) -> LocalSolves:
    r"""GIANT's local solver: ``iterations`` steps of conjugate gradients on
    :math:`(\tilde A_k^\top\tilde A_k + \lambda' I)p = g` for all machines at once, matrix-free
    (each step costs two [r, d] products per machine instead of forming Ĥ_k). No
    log-determinants (NaN): determinantal averaging needs the Cholesky solver.
    """
    local_lam = check_lam(local_lam)
    positive_int(iterations, "CG iterations")
    apply = lambda v: (rows.mT @ (rows @ v.unsqueeze(-1))).squeeze(-1) + local_lam * v
    q = rows.shape[0]
    x = torch.zeros(q, rows.shape[2], dtype=DTYPE)
    r = gradient.expand(q, -1).clone()
    p, rr = r.clone(), (r * r).sum(-1)
    stop = (rr.sqrt() <= 1e-14 * float(gradient.norm())) | (rr == 0)
    for _ in range(int(iterations)):
        if bool(stop.all()):
            break
        ap = apply(p)
        alpha = torch.where(stop, 0.0, rr / (p * ap).sum(-1))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        new = (r * r).sum(-1)
        beta = torch.where(stop, 0.0, new / rr.clamp_min(torch.finfo(DTYPE).tiny))
        p, rr = r + beta[:, None] * p, new
        stop = stop | (rr.sqrt() <= 1e-14 * float(gradient.norm()))
    return LocalSolves(x, torch.full((q,), float("nan"), dtype=DTYPE))


def local_directions(hessians: Tensor, gradient: Tensor) -> LocalSolves:
    r"""Solve :math:`\hat H_k \hat p_k = g` for all k by batched Cholesky; also log det Ĥ_k."""
    if hessians.ndim != 3 or hessians.shape[1] != hessians.shape[2]:
        raise ValueError(f"hessians must be [q, d, d], got {tuple(hessians.shape)}")
    if gradient.shape != (hessians.shape[1],):
        raise ValueError(f"gradient must be [{hessians.shape[1]}], got {tuple(gradient.shape)}")
    chol, info = torch.linalg.cholesky_ex(hessians)
    if bool((info != 0).any()):
        bad = torch.nonzero(info).flatten()[:5].tolist()
        raise ValueError(
            f"local Hessians of machines {bad} are not positive definite; use a positive "
            "regularizer and a larger sketch"
        )
    rhs = gradient.expand(hessians.shape[0], -1).unsqueeze(-1)
    directions = torch.cholesky_solve(rhs, chol).squeeze(-1)
    logdets = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return LocalSolves(directions, logdets)


@dataclass(frozen=True)
class CombinedDirection:
    r"""The combined step ``direction``, machine ``weights`` (sum 1), their effective sample size
    :math:`(\sum a)^2/\sum a^2`, and the ``step_scale`` already applied.
    """

    direction: Tensor
    weights: Tensor
    effective_sample_size: float
    step_scale: float


def local_regularization(lam: float, effective_dim: float, m: int, scaled: bool) -> ScaledRegularization:
    """The machines' regularizer and the combined step's scale: :func:`scaled_regularization`
    when ``scaled``, else λ itself and scale 1.
    """
    return scaled_regularization(lam, effective_dim, m) if scaled else ScaledRegularization(check_lam(lam), 1.0)


def machine_weights(averaging: str, logdets: Tensor, max_logdet: float) -> Tensor:
    r"""Unnormalized weights :math:`a_k` of the machines owning ``logdets``: 1 for uniform
    averaging, :math:`\exp(\ell_k - \max_j \ell_j)` for determinantal averaging (``max_logdet``
    is the maximum over *all* machines, an all-reduce in a real run).
    """
    if averaging == "uniform":
        return torch.ones_like(logdets)
    if averaging == "determinantal":
        if not (bool(torch.isfinite(logdets).all()) and math.isfinite(max_logdet)):
            raise ValueError("log-determinants must be finite (are the local Hessians PD?)")
        return torch.exp(logdets - max_logdet)
    raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")


def determinantal_weights(logdets: Tensor) -> Tensor:
    r"""Normalized :math:`a_k \propto \det\hat H_k`, via :math:`\exp(\ell_k - \max_j\ell_j)`."""
    a = machine_weights("determinantal", logdets, float(logdets.max()))
    return a / a.sum()


def combined_direction(weighted_sum: Tensor, weights: Tensor, step_scale: float) -> CombinedDirection:
    r""":math:`\gamma \sum_k a_k\hat p_k / \sum_k a_k` from ``weighted_sum`` = Σ a_k p̂_k and
    the unnormalized ``weights`` a [q] of all machines, ``step_scale`` γ.
    """
    if not (math.isfinite(step_scale) and step_scale > 0):
        raise ValueError(f"step_scale must be positive, got {step_scale}")
    total = weights.sum()
    normalized = weights / total
    ess = float(1.0 / (normalized**2).sum())
    return CombinedDirection(step_scale * weighted_sum / total, normalized, ess, float(step_scale))


def combine(solves: LocalSolves, averaging: str = "uniform", step_scale: float = 1.0) -> CombinedDirection:
    """Average the local directions (``"uniform"`` or ``"determinantal"``), times ``step_scale``."""
    a = machine_weights(averaging, solves.logdets, float(solves.logdets.max()))
    return combined_direction(a @ solves.directions, a, step_scale)
