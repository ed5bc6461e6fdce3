r"""The leave-one-out sketch shared by XTrace and XDiag (Epperly, Tropp, Webber 2024).

With Rademacher :math:`\Omega = [\omega_1 \dots \omega_s]`, :math:`Y = A\Omega = QR` and
:math:`Z = AQ`, the projector onto the columns of :math:`Y` other than :math:`i` is
:math:`\Pi_i = Q(I - s_i s_i^\top)Q^\top` with :math:`s_i = R^{-\top}e_i / \|R^{-\top}e_i\|`: the
direction of :math:`\mathrm{span}(Y)` that only column :math:`i` contributes. :math:`\Pi_i` does not
depend on :math:`\omega_i`, which keeps the exchangeable estimators unbiased.
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
