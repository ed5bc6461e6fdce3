r"""Solves with a symmetric operator: :math:`(A + \lambda I)x = b` for one or many right-hand sides.

* ``method="cg"``: conjugate gradients (Hestenes & Stiefel 1952) for positive definite systems
  (Gauss-Newton, a damped Hessian near a minimum; Newton-CG, Martens 2010). A column that meets
  non-positive curvature :math:`p^\top (A+\lambda I) p \le 0` stops and is reported unconverged.
* ``method="minres"``: MINRES (Paige & Saunders 1975) for symmetric indefinite systems (a Hessian
  away from a minimum); the residual norm decreases monotonically.

All columns advance together: one batched product per iteration over the columns not yet
converged. ``residuals`` are the recurrences' relative residual norms :math:`\|b - (A+\lambda I)x\|/\|b\|`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.linalg.progress import ticking
from secondorder.linalg.results import SolveResult
from secondorder.operators.base import LinearOperator, working_operator
from secondorder.validation import positive_int, tolerance


def _damped(A: LinearOperator, damping: float, V: Tensor) -> Tensor:
    out = A @ V
    return out + damping * V if damping else out


def _cg(A, B, damping, tol, maxiter):
    X = torch.zeros_like(B)
    R = B.clone()
    D = R.clone()
    bnorm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    rs = (R * R).sum(0)
    active = rs.sqrt() > tol * bnorm
    it = 0
    while it < maxiter and bool(active.any()):
        it += 1
        running = active.nonzero().flatten()
        AD = _damped(A, damping, D[:, running])
        curvature = (D[:, running] * AD).sum(0)
        good = curvature > 0
        active[running[~good]] = False  # non-positive curvature: these columns stop
        cols, AD, curvature = running[good], AD[:, good], curvature[good]
        alpha = rs[cols] / curvature
        X[:, cols] += alpha * D[:, cols]
        R[:, cols] -= alpha * AD
        rs_new = (R[:, cols] ** 2).sum(0)
        D[:, cols] = R[:, cols] + (rs_new / rs[cols]) * D[:, cols]
        rs[cols] = rs_new
        active[cols] = rs_new.sqrt() > tol * bnorm[cols]
    residuals = rs.sqrt() / bnorm
    return X, residuals, residuals <= tol, it


def _minres(A, B, damping, tol, maxiter, curvature=False, inexactness=None):
    r"""MINRES on every column; with ``curvature`` (or ``inexactness``) it also keeps :math:`AX`
    (from the products it makes anyway), stops a column at non-positive curvature or when
    :math:`\langle b, Ax\rangle \ge (1-\theta)\|b\|^2`, and returns each column's exit and residual.
    """
    K = B.shape[1]
    zeros = lambda: torch.zeros(K, dtype=B.dtype, device=B.device)  # noqa: E731
    X, W, W2 = torch.zeros_like(B), torch.zeros_like(B), torch.zeros_like(B)
    R1, R2, Y = B.clone(), B.clone(), B.clone()
    beta = B.norm(dim=0)
    bnorm = beta.clamp_min(torch.finfo(B.dtype).tiny)
    oldb, dbar, epsln, sn = zeros(), zeros(), zeros(), zeros()
    cs = -torch.ones(K, dtype=B.dtype, device=B.device)
    phibar = beta.clone()
    active = beta > tol * bnorm
    tracked = curvature or inexactness is not None
    if tracked:  # A W, A W2 and A X alongside W, W2 and X; each column's exit and final residual
        AW, AW2, AX, exits, Rk = torch.zeros_like(B), torch.zeros_like(B), torch.zeros_like(B), [""] * K, B.clone()
    it = 0
    while it < maxiter and bool(active.any()):
        it += 1
        c = active.nonzero().flatten()
        V = Y[:, c] / beta[c]
        Yc = _damped(A, damping, V)
        AV = Yc if tracked else None
        if it >= 2:
            Yc = Yc - (beta[c] / oldb[c]) * R1[:, c]
        alfa = (V * Yc).sum(0)
        Yc = Yc - (alfa / beta[c]) * R2[:, c]
        R1[:, c], R2[:, c] = R2[:, c], Yc
        oldb[c] = beta[c]
        beta_c = Yc.norm(dim=0)
        oldeps = epsln[c]
        delta = cs[c] * dbar[c] + sn[c] * alfa
        gbar = sn[c] * dbar[c] - cs[c] * alfa
        if curvature:  # c_{k-1} gamma_k^(1) >= 0: the residual r_{k-1} has r^T A r <= 0 (Liu & Roosta 2022)
            npc = cs[c] * gbar >= 0
            for j in c[npc].tolist():
                exits[j], Rk[:, j] = "negative curvature", B[:, j] - AX[:, j]
            active[c[npc]] = False
            keep = ~npc
            c, V, AV, Yc, alfa, beta_c, oldeps, delta, gbar = (
                x[..., keep] for x in (c, V, AV, Yc, alfa, beta_c, oldeps, delta, gbar))
            if not c.numel():
                continue
        epsln[c] = sn[c] * beta_c
        dbar[c] = -cs[c] * beta_c
        gamma = torch.hypot(gbar, beta_c).clamp_min(torch.finfo(B.dtype).eps)
        cs[c], sn[c] = gbar / gamma, beta_c / gamma
        phi = cs[c] * phibar[c]
        phibar[c] = sn[c] * phibar[c]
        W1 = W2[:, c]
        W2[:, c] = W[:, c]
        W[:, c] = (V - oldeps * W1 - delta * W2[:, c]) / gamma
        X[:, c] += phi * W[:, c]
        if tracked:
            AW1 = AW2[:, c]
            AW2[:, c] = AW[:, c]
            AW[:, c] = (AV - oldeps * AW1 - delta * AW2[:, c]) / gamma
            AX[:, c] += phi * AW[:, c]
        beta[c] = beta_c
        Y[:, c] = Yc
        done = (phibar[c] <= tol * bnorm[c]) | (beta_c <= torch.finfo(B.dtype).eps * bnorm[c])
        if inexactness is not None:
            done |= (B[:, c] * AX[:, c]).sum(0) >= (1 - inexactness) * bnorm[c] ** 2
        active[c[done]] = False
    residuals = phibar / bnorm
    if not tracked:
        return X, residuals, residuals <= tol, it
    for j in range(K):
        if not exits[j]:
            exits[j], Rk[:, j] = ("iterations" if bool(active[j]) else "solution"), B[:, j] - AX[:, j]
    return X, residuals, residuals <= tol, it, tuple(exits), Rk


def solve(
    A: LinearOperator | Tensor,
    b: Tensor,
    damping: float = 0.0,
    method: str = "cg",
    tol: float = 1e-6,
    maxiter: int | None = None,
    progress: bool = False,
    *,
    curvature: bool = False,
    inexactness: float | None = None,
) -> SolveResult:
    r"""Solve ``(A + damping I) x = b`` for ``b`` ``[P]`` or several right-hand sides ``[P, K]``.

    Args:
        A: a symmetric operator or dense tensor.
        b: right-hand side(s).
        damping: Tikhonov/Levenberg-Marquardt damping added to the diagonal.
        method: ``"cg"`` (positive definite) or ``"minres"`` (symmetric indefinite).
        tol: relative residual tolerance per column.
        maxiter: iteration cap (default ``10 P``, as SciPy: rounding makes CG need more than ``P`` steps).
        progress: show a progress bar of the products on stderr.
        curvature: (MINRES) stop a column as soon as its Krylov space shows non-positive
            curvature, MINRES-NPC (Liu & Roosta 2022): at step :math:`k` the test
            :math:`c_{k-1}\gamma^{(1)}_k \ge 0` of the QR recurrence certifies
            :math:`r_{k-1}^\top (A+\lambda I) r_{k-1} \le 0`; the column keeps :math:`x_{k-1}` and
            ``directions`` holds :math:`r_{k-1}`, a descent direction for a gradient
            :math:`-b` (:math:`b^\top r = \|r\|^2`) of non-positive curvature.
        inexactness: (MINRES) also stop a column once
            :math:`\langle b, (A+\lambda I)x\rangle \ge (1-\theta)\|b\|^2`, Newton-MR's inexactness
            condition (Roosta, Liu, Xu & Mahoney 2018) for :math:`\theta` = ``inexactness``.

    Returns:
        :class:`SolveResult` with ``solution`` shaped like ``b``; with ``curvature`` or
        ``inexactness``, ``exits`` per column (``"solution"``, ``"negative curvature"``,
        ``"iterations"``) and ``directions``, the final residuals :math:`b - (A+\lambda I)x` (the
        curvature directions of the columns that met one), shaped like ``b``; both computed from
        the products the solver makes anyway.

    """
    A = working_operator(A)
    P = A.shape[0]
    if not isinstance(b, Tensor) or b.ndim not in (1, 2) or b.shape[0] != P:
        shape = list(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"b must be [{P}] or [{P}, K] to match the operator, got {shape}")
    if method not in ("cg", "minres"):
        raise ValueError(f"method must be 'cg' or 'minres', got {method!r}")
    tolerance(tol)
    if (curvature or inexactness is not None) and method != "minres":
        raise ValueError("curvature= and inexactness= are MINRES options: pass method='minres'")
    if inexactness is not None:
        tolerance(inexactness, "inexactness")
    maxiter = 10 * P if maxiter is None else positive_int(maxiter, "maxiter")
    B = (b if b.ndim == 2 else b.unsqueeze(1)).to(A.dtype)
    shaped = (lambda M: M) if b.ndim == 2 else (lambda M: M.squeeze(1))  # noqa: E731
    with ticking(A, progress, maxiter * B.shape[1], f"solve ({method})") as op, torch.no_grad():
        start = op.num_matvecs
        if method == "cg":
            X, residuals, converged, iterations = _cg(op, B, float(damping), tol, maxiter)
            exits, directions = None, None
        else:
            out = _minres(op, B, float(damping), tol, maxiter, curvature, inexactness)
            X, residuals, converged, iterations = out[:4]
            exits, directions = (out[4], shaped(out[5])) if len(out) > 4 else (None, None)
        used = op.num_matvecs - start
    return SolveResult(
        solution=shaped(X), residuals=residuals, converged=converged,
        iterations=iterations, num_matvecs=used, method=method, exits=exits, directions=directions,
    )
