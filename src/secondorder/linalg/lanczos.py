r"""The Lanczos process (Lanczos 1950) for several start vectors at once, one step at a time.

For each column :math:`v_1` of ``V`` (normalized), step :math:`j` computes
:math:`w = A v_j - \alpha_j v_j - \beta_{j-1} v_{j-1}` with :math:`\alpha_j = v_j^\top A v_j`, then
(optionally) reorthogonalizes :math:`w` against every earlier :math:`v` (two passes of classical
Gram-Schmidt), and :math:`\beta_j = \|w\|`, :math:`v_{j+1} = w / \beta_j`, so that
:math:`A V_j = V_j T_j + \beta_j v_{j+1} e_j^\top` with :math:`T_j` tridiagonal. A column whose
:math:`\beta_j` falls to rounding relative to :math:`\max_i |\alpha_i| + \beta_i` has found an
invariant subspace (breakdown) and stops. Every step is one batched product over the columns
still running.

:class:`Lanczos` is an iterator: it yields itself after each step, so a consumer can read
:math:`T_j`, the basis and the pending :math:`\beta_j, w` and stop whenever its own test is met
(the cubic sub-problem, :mod:`secondorder.linalg.subproblems`), or run all steps (stochastic
Lanczos quadrature, :mod:`secondorder.linalg.density`).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from secondorder.operators.base import LinearOperator


class Lanczos:
    r"""Up to ``m`` Lanczos steps of ``A`` from each column of ``V`` ``[P, R]`` (unit columns).

    After step ``j`` (0-based): ``alphas`` holds ``j + 1`` rows ``[R]``, ``betas`` the ``j``
    couplings of :math:`T`, ``beta`` ``[R]`` and ``w`` ``[P, R]`` the pending :math:`\beta_j` and
    :math:`\beta_j v_{j+1}`, ``basis`` ``[R, m, P]`` the vectors (with ``reorthogonalize``; its
    first ``j + 1`` rows are set), ``length`` ``[R]`` the steps each column keeps (``m`` unless
    it broke down), ``active`` which columns still run and ``broke`` which broke down at this step.
    """

    def __init__(self, A: LinearOperator, V: Tensor, m: int, reorthogonalize: bool = True) -> None:
        self.A, self.m, self.reorthogonalize = A, m, reorthogonalize
        R = V.shape[1]
        self.v = V
        # [probe, step, P]: each probe's basis contiguous, so that its projections are batched matmuls
        self.basis = torch.empty(R, m if reorthogonalize else 0, A.shape[0], dtype=V.dtype, device=V.device)
        if reorthogonalize:
            self.basis[:, 0] = self.v.T
        self.alphas: list[Tensor] = []
        self.betas: list[Tensor] = []
        self.length = torch.full((R,), m, dtype=torch.long)
        self.active = torch.ones(R, dtype=torch.bool)
        self.beta = torch.zeros(R, dtype=A.dtype, device=A.device)
        self.w = torch.zeros_like(self.v)
        self.broke = torch.zeros(R, dtype=torch.bool)

    def __iter__(self) -> Iterator["Lanczos"]:
        A, v, m = self.A, self.v, self.m
        eps = torch.finfo(A.dtype).eps
        prev, beta_prev = torch.zeros_like(v), torch.zeros(v.shape[1], dtype=A.dtype, device=A.device)
        scale = torch.zeros(v.shape[1], dtype=torch.float64)
        for j in range(m):
            cols = self.active.nonzero().flatten().to(A.device)
            w = torch.zeros_like(v)
            w[:, cols] = A @ v[:, cols]
            alpha = (v * w).sum(0)
            w = w - alpha * v - beta_prev * prev
            if self.reorthogonalize:
                B = self.basis[:, : j + 1]  # [R, j+1, P]
                for _ in range(2):  # two passes of classical Gram-Schmidt, without a basis-sized temporary
                    w = w - torch.bmm(B.transpose(1, 2), torch.bmm(B, w.T.unsqueeze(2))).squeeze(2).T
            beta = w.norm(dim=0)
            self.alphas.append(alpha)
            scale = torch.maximum(scale, alpha.abs().double().cpu() + beta.double().cpu())
            broke = self.active & (beta.double().cpu() <= 100 * eps * scale.clamp_min(1e-300))
            self.beta, self.w, self.broke = beta, w, broke
            yield self
            if j == m - 1:
                return
            self.length[broke] = j + 1
            self.active &= ~broke
            beta = torch.where(self.active.to(A.device), beta, torch.zeros_like(beta))
            self.betas.append(beta)
            if not bool(self.active.any()):
                return
            prev, v = v, w / torch.where(beta > 0, beta, torch.ones_like(beta))
            beta_prev = beta
            if self.reorthogonalize:
                self.basis[:, j + 1] = v.T

    def tridiagonal(self, r: int, steps: int | None = None) -> Tensor:
        """Column ``r``'s :math:`T` (float64, on the CPU) of its first ``steps`` steps (all so far by default)."""
        L = len(self.alphas) if steps is None else steps
        a = torch.stack(self.alphas[:L]).double().cpu()[:, r]
        b = torch.stack(self.betas[: L - 1]).double().cpu()[:, r] if L > 1 else a.new_zeros(0)
        return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
