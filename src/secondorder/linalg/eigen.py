r"""Extreme eigenpairs of a symmetric operator.

* ``method="lanczos"`` (default): thick-restart Lanczos (Wu & Simon 2000, equivalent to
  implicitly restarted Lanczos, Sorensen 1992) with full reorthogonalization (two passes of
  classical Gram-Schmidt). Each cycle extends the basis to ``ncv`` vectors, takes the Ritz pairs
  of :math:`T = V^\top A V` after every step, and stops as soon as every wanted Ritz pair has residual
  :math:`\|A y - \theta y\| = |\beta_m s_{m}| \le \mathrm{tol}\cdot\|A\|` (estimated by the largest
  Ritz value in magnitude). Otherwise it keeps the best ``k + (ncv - k) // 2`` Ritz vectors plus
  the residual direction and continues (the arrowhead restart).
* ``method="power"``: block power (subspace) iteration with Rayleigh-Ritz, one batched product of
  ``k`` vectors per iteration, stopping on the same residual test; for ``which`` other than
  ``"magnitude"`` it runs on the spectrally shifted :math:`A + cI` or :math:`cI - A`.

``which``: ``"largest"`` and ``"smallest"`` are algebraic (the sharpness is the largest);
``"magnitude"`` is the largest :math:`|\lambda|`, which is what PyHessian's power iteration returns.
"""

from __future__ import annotations


import torch
from torch import Tensor

from secondorder.linalg.probes import Seed, make_generator
from secondorder.linalg.progress import ticking
from secondorder.linalg.results import EigenResult
from secondorder.operators.base import IdentityOperator, LinearOperator, as_operator

_WHICH = ("largest", "smallest", "magnitude")


def _order(theta: Tensor, which: str) -> Tensor:
    """Indices of ``theta`` from most to least wanted."""
    key = {"largest": -theta, "smallest": theta, "magnitude": -theta.abs()}[which]
    return torch.argsort(key, stable=True)


def _orthogonalize(w: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Two passes of classical Gram-Schmidt of ``w`` against the columns of ``V``; returns the coefficients too."""
    h = V.T @ w
    w = w - V @ h
    h2 = V.T @ w
    return w - V @ h2, h + h2


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _lanczos(A, k, which, tol, max_matvecs, ncv, gen):
    P = A.shape[0]
    m = min(P, ncv or max(2 * k + 10, 20))
    if m <= k:
        raise ValueError(f"ncv must exceed k; got ncv={m}, k={k}")
    dtype, device = A.dtype, A.device
    eps = torch.finfo(dtype).eps
    V = torch.zeros(P, m + 1, dtype=dtype, device=device)
    T = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    v = torch.randn(P, generator=gen, device=gen.device, dtype=torch.float64).to(device=device, dtype=dtype)
    V[:, 0] = v / v.norm()
    start, matvecs, restarts, anorm = 0, 0, 0, 0.0
    history: list[tuple[float, ...]] = []
    while True:
        for j in range(start, m):
            w = A @ V[:, j]
            matvecs += 1
            w, h = _orthogonalize(w, V[:, : j + 1])
            h64 = h.double().cpu()
            T[: j + 1, j] = h64
            T[j, : j + 1] = h64
            beta = float(w.norm())
            anorm = max(anorm, float(h64.abs().max()), beta)
            if beta <= 100 * eps * max(anorm, 1e-300) and j + 1 < P:
                # invariant subspace found: continue with a fresh direction orthogonal to the basis
                w = torch.randn(P, generator=gen, device=gen.device, dtype=torch.float64).to(device=device, dtype=dtype)
                w, _ = _orthogonalize(w, V[:, : j + 1])
                beta_T = 0.0
            elif j + 1 >= P:
                w, beta_T = torch.zeros_like(w), 0.0
            else:
                beta_T = beta
            T[j + 1, j] = T[j, j + 1] = beta_T
            nrm = w.norm()
            V[:, j + 1] = w / nrm if nrm > 0 else w
            n = j + 1
            if n < k or (beta_T == 0.0 and n < m):
                # after a breakdown every Ritz pair has residual 0, but the fresh direction may
                # still add copies of a repeated eigenvalue: extend before testing convergence
                continue
            # Rayleigh-Ritz on the current basis after every step (a small n x n eigh)
            theta, S = torch.linalg.eigh(T[:n, :n])
            anorm = max(anorm, float(theta.abs().max()))
            order = _order(theta, which)
            residuals = (T[n, n - 1].abs() * S[n - 1, :].abs())[order]
            history.append(tuple(residuals[:k].tolist()))
            converged = residuals[:k] <= tol * anorm
            if bool(converged.all()) or matvecs >= max_matvecs:
                Y = V[:, :n] @ S[:, order[:k]].to(dtype=dtype, device=device)
                return theta[order[:k]], Y, residuals[:k], converged, matvecs, restarts, history
        keep = min(m - 1, k + (m - k) // 2)
        idx = order[:keep]
        V[:, :keep] = V[:, :m] @ S[:, idx].to(dtype=dtype, device=device)
        V[:, keep] = V[:, m]
        arrow = T[m, m - 1] * S[m - 1, idx]
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[idx])
        T[keep, :keep] = T[:keep, keep] = arrow
        start, restarts = keep, restarts + 1


def _subspace(B: LinearOperator, k: int, tol: float, max_matvecs: int, gen, which: str, shift: float, sign: float,
              X: Tensor | None = None):
    """Block power iteration on ``sign * A + shift * I`` (given as the operator ``B``'s products),
    from the block ``X`` or a random one."""
    if X is None:
        P = B.shape[0]
        X = torch.randn(P, k, generator=gen, device=gen.device, dtype=torch.float64).to(device=B.device, dtype=B.dtype)
    X, _ = torch.linalg.qr(X)
    matvecs, history = 0, []
    while True:
        AX = B @ X
        matvecs += k
        theta, S = torch.linalg.eigh((X.T @ AX).double().cpu())
        theta, S = theta.flip(0), S.flip(1)  # dominant first
        S = S.to(dtype=B.dtype, device=B.device)
        X, AX = X @ S, AX @ S
        residuals = (AX - X * theta.to(B.dtype).to(B.device)).norm(dim=0).double().cpu()
        lam = (theta - shift) / sign
        history.append(tuple(residuals.tolist()))
        anorm = float(lam.abs().max())
        converged = residuals <= tol * max(anorm, 1e-300)
        if bool(converged.all()) or matvecs >= max_matvecs:
            order = _order(lam, which)
            return lam[order], X[:, order], residuals[order], converged[order], matvecs, len(history) - 1, history
        X, _ = torch.linalg.qr(AX)


def _power(A, k, which, tol, max_matvecs, gen):
    """Block power iteration within ``max_matvecs`` products.

    For "largest" ("smallest"): iterate on A itself with half the budget; if the k dominant
    eigenvalues all have the wanted sign they are the wanted ones (the usual case for the top of
    a Hessian), and the iteration continues from that block with the rest of the budget.
    Otherwise shift, :math:`\\pm A + 1.05\\rho I` with ρ the dominant magnitude seen, so the
    wanted end dominates, and spend the rest there.
    """
    if which == "magnitude":
        return _subspace(A, k, tol, max_matvecs, gen, which, 0.0, 1.0)
    sign = 1.0 if which == "largest" else -1.0
    first = _subspace(A, k, tol, max(k, max_matvecs // 2), gen, which, 0.0, 1.0)
    left = max(k, max_matvecs - first[4])
    if bool((sign * first[0] > 0).all()):
        if bool(first[3].all()) or first[4] >= max_matvecs:
            return first
        out = _subspace(A, k, tol, left, gen, which, 0.0, 1.0, X=first[1])
    else:
        radius = 1.05 * float(first[0].abs().max())
        shifted = sign * A + radius * IdentityOperator(A.shape[0], A.dtype, A.device)
        out = _subspace(shifted, k, tol, left, gen, which, radius, sign)
    return out[:4] + (out[4] + first[4], out[5] + first[5] + 1, first[6] + out[6])


def eigenvalues(
    A: LinearOperator | Tensor,
    k: int = 1,
    which: str = "largest",
    tol: float | None = None,
    method: str = "lanczos",
    max_matvecs: int | None = None,
    ncv: int | None = None,
    seed: Seed = None,
    progress: bool = False,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator, certified by their residuals.

    Args:
        A: a symmetric operator or dense tensor.
        k: number of eigenpairs, ``1 <= k < P``.
        which: ``"largest"`` / ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative residual tolerance, ``||Av - theta v|| <= tol * ||A||`` (default 1e-10 in
            float64, 1e-5 otherwise: eigenvalue errors are about ``residual^2 / gap``).
        method: ``"lanczos"`` (thick restart) or ``"power"`` (block power iteration).
        max_matvecs: budget (default ``max(500, 50 k)``); unconverged pairs have ``converged=False``.
        ncv: Lanczos basis size (default ``max(2k + 10, 20)``, capped at P).
        seed: int, generator or ``None``.
        progress: show a progress bar of the products (up to ``max_matvecs``) on stderr.

    Returns:
        :class:`EigenResult`, eigenvalues sorted from most to least wanted.
    """
    A = as_operator(A)
    P = A.shape[0]
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not isinstance(k, int) or not 1 <= k < P:
        raise ValueError(f"k must be an integer with 1 <= k < P = {P}, got {k!r}; for all eigenvalues use torch.linalg.eigvalsh on A.to_dense()")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    tol = _default_tol(A.dtype) if tol is None else tol
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    max_matvecs = max(500, 50 * k) if max_matvecs is None else max_matvecs
    if max_matvecs < 1:
        raise ValueError(f"max_matvecs must be >= 1, got {max_matvecs}")
    gen = make_generator(seed, A)
    with ticking(A, progress, max_matvecs, f"eigenvalues ({method})") as op, torch.no_grad():
        if method == "lanczos":
            out = _lanczos(op, k, which, tol, max_matvecs, ncv, gen)
        else:
            out = _power(op, k, which, tol, max_matvecs, gen)
    theta, Y, res, conv, matvecs, restarts, history = out
    return EigenResult(
        eigenvalues=theta.to(A.dtype), eigenvectors=Y, residuals=res.to(A.dtype), converged=conv,
        num_matvecs=matvecs, num_restarts=restarts, which=which, method=method, residual_history=tuple(history),
    )
