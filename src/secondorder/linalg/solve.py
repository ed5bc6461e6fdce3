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


def _minres(A, B, damping, tol, maxiter):
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
    it = 0
    while it < maxiter and bool(active.any()):
        it += 1
        c = active.nonzero().flatten()
        V = Y[:, c] / beta[c]
        Yc = _damped(A, damping, V)
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
        beta[c] = beta_c
        Y[:, c] = Yc
        done = (phibar[c] <= tol * bnorm[c]) | (beta_c <= torch.finfo(B.dtype).eps * bnorm[c])
        active[c[done]] = False
    residuals = phibar / bnorm
    return X, residuals, residuals <= tol, it


def solve(
    A: LinearOperator | Tensor,
    b: Tensor,
    damping: float = 0.0,
    method: str = "cg",
    tol: float = 1e-6,
    maxiter: int | None = None,
    progress: bool = False,
) -> SolveResult:
    """Solve ``(A + damping I) x = b`` for ``b`` ``[P]`` or several right-hand sides ``[P, K]``.

    Args:
        A: a symmetric operator or dense tensor.
        b: right-hand side(s).
        damping: Tikhonov/Levenberg-Marquardt damping added to the diagonal.
        method: ``"cg"`` (positive definite) or ``"minres"`` (symmetric indefinite).
        tol: relative residual tolerance per column.
        maxiter: iteration cap (default ``10 P``, as SciPy: rounding makes CG need more than ``P`` steps).
        progress: show a progress bar of the products on stderr.

    Returns:
        :class:`SolveResult` with ``solution`` shaped like ``b``.

    """
    A = working_operator(A)
    P = A.shape[0]
    if not isinstance(b, Tensor) or b.ndim not in (1, 2) or b.shape[0] != P:
        shape = list(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise ValueError(f"b must be [{P}] or [{P}, K] to match the operator, got {shape}")
    if method not in ("cg", "minres"):
        raise ValueError(f"method must be 'cg' or 'minres', got {method!r}")
    tolerance(tol)
    maxiter = 10 * P if maxiter is None else positive_int(maxiter, "maxiter")
    B = (b if b.ndim == 2 else b.unsqueeze(1)).to(A.dtype)
    with ticking(A, progress, maxiter * B.shape[1], f"solve ({method})") as op, torch.no_grad():
        start = op.num_matvecs
        X, residuals, converged, iterations = (_cg if method == "cg" else _minres)(op, B, float(damping), tol, maxiter)
        used = op.num_matvecs - start
    return SolveResult(
        solution=X if b.ndim == 2 else X.squeeze(1), residuals=residuals, converged=converged,
        iterations=iterations, num_matvecs=used, method=method,
    )
