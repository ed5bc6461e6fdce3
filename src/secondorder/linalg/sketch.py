r"""The leave-one-out sketch shared by XTrace and XDiag (Epperly, Tropp, Webber 2024).

With Rademacher :math:`\Omega = [\omega_1 \dots \omega_s]`, :math:`Y = A\Omega = QR` and
:math:`Z = AQ`, the projector onto the columns of :math:`Y` other than :math:`i` is
:math:`\Pi_i = Q(I - s_i s_i^\top)Q^\top` with :math:`s_i = R^{-\top}e_i / \|R^{-\top}e_i\|`: the
direction of :math:`\mathrm{span}(Y)` that only column :math:`i` contributes. :math:`\Pi_i` does not
depend on :math:`\omega_i`, which keeps the exchangeable estimators unbiased.

Leaving a second column :math:`j` out as well removes one more direction,
:math:`u_{ij} = (s_j - \rho_{ij}s_i)/\nu_{ij}` with :math:`\rho_{ij} = s_i^\top s_j` and
:math:`\nu_{ij} = (1-\rho_{ij}^2)^{1/2}`: :math:`\Pi_{ij} = \Pi_i - Qu_{ij}u_{ij}^\top Q^\top`.
:class:`LeaveTwoOut` holds that geometry, from which the estimators' standard errors follow
without further products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from secondorder.linalg.probes import rademacher
from secondorder.operators.base import LinearOperator


@dataclass(frozen=True)
class LeaveOneOutSketch:
    """``Omega``, ``Y = A Omega = Q R``, ``Z = A Q`` and the unit columns ``S`` (``s_i``)."""

    Omega: Tensor
    Y: Tensor
    Q: Tensor
    R: Tensor
    Z: Tensor
    S: Tensor


def leave_one_out_sketch(A: LinearOperator, s: int, gen: torch.Generator, method: str) -> LeaveOneOutSketch:
    """Build the sketch with ``2 s`` products (``s`` for ``Y``, ``s`` for ``Z``)."""
    Omega = rademacher(A, s, gen)
    Y = A @ Omega
    Q, R = torch.linalg.qr(Y)
    Z = A @ Q
    S = torch.linalg.solve_triangular(R, torch.eye(s, dtype=R.dtype, device=R.device), upper=True).T
    if not torch.isfinite(S).all():
        raise ValueError(
            f"{method}'s sketch is rank deficient (the operator has rank < num_matvecs/2); "
            "use the 'hutch++' trace or the 'hutchinson' diagonal"
        )
    return LeaveOneOutSketch(Omega, Y, Q, R, Z, S / S.norm(dim=0, keepdim=True))


@dataclass(frozen=True)
class LeaveTwoOut:
    """``rho[i, j] = s_i^T s_j``, ``nu[i, j] = ||s_j - rho_ij s_i||`` (1 on the diagonal) and
    ``off`` (``i != j``) for the directions ``u_ij`` that leaving out column ``j`` too removes.
    """

    rho: Tensor
    nu: Tensor
    off: Tensor

    @classmethod
    def of(cls, S: Tensor) -> "LeaveTwoOut":
        rho = S.T @ S
        off = ~torch.eye(S.shape[1], dtype=torch.bool, device=S.device)
        nu = torch.where(off, (1 - rho**2).clamp_min(0).sqrt(), torch.ones_like(rho))
        return cls(rho, nu, off)

    def along(self, SX: Tensor) -> Tensor:
        """``[..., i, j] = u_ij^T x_i`` from ``SX[..., k, i] = s_k^T x_i`` (``S^T X``)."""
        own = SX.diagonal(dim1=-2, dim2=-1)[..., :, None]  # s_i^T x_i
        return (SX.transpose(-2, -1) - self.rho * own) / self.nu


def with_covariance(stderr: Tensor, covariance: Tensor) -> Tensor:
    """The standard error of a mean of ``n`` exchangeable samples: ``stderr = std / sqrt(n)`` alone
    misses the covariance of two samples; a negative ``covariance`` estimate counts as zero.
    """
    return (stderr**2 + covariance.clamp_min(0)).sqrt()
