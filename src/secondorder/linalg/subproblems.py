r"""The sub-problems of trust-region and cubic-regularization methods, matrix-free.

* :func:`steihaug`: CG-Steihaug (Steihaug 1983; Toint 1981) for the trust-region model
  :math:`\min_s\ m(s) = g^\top s + \frac12 s^\top H s` subject to :math:`\|s\| \le \Delta`.
  Conjugate gradients from ``start`` (zero by default) until the residual
  :math:`\|\nabla m(s)\|` falls below ``rtol`` :math:`\|g\|`, or until the iterate would
  leave the ball or meets a direction of non-positive curvature :math:`p^\top H p \le 0`; in the
  last two cases the step goes along :math:`p` to the boundary. A non-zero ``start`` minimizes over
  :math:`s_0 + \mathcal K(H, r_0)`, which contains directions absent from
  :math:`\mathcal K(H, g)`: Xu, Roosta & Mahoney's code starts from a random vector of norm
  :math:`0.99\Delta`, so that negative curvature that :math:`g` misses is found (a saddle's stable
  manifold, a zero-initialized network). The model value is kept from the loop's own products
  (one product per iteration, one more for a non-zero start).
* :func:`cubic`: the adaptive-cubic-regularization model
  :math:`\min_s\ g^\top s + \frac12 s^\top H s + \frac\sigma3\|s\|^3` (Cartis, Gould & Toint 2011)
  over the Krylov space of Lanczos with full reorthogonalization (:mod:`secondorder.linalg.lanczos`)
  from :math:`g` perturbed by ``noise`` :math:`\|g\|` times a random unit vector (Xu et al.'s
  perturbed start, for the same reason). In the Krylov space :math:`s = Qz` the model is
  :math:`\tilde g^\top z + \frac12 z^\top T z + \frac\sigma3\|z\|^3` with :math:`\tilde g = Q^\top g`,
  solved exactly: with :math:`T = U\Lambda U^\top`, :math:`a = U^\top\tilde g`, the minimizer is
  :math:`z = -U(\Lambda + \mu I)^{-1}a` for the root :math:`\mu = \sigma\|z\| \ge \max(0, -\lambda_1)`
  of the secular equation :math:`\|(\Lambda+\mu I)^{-1}a\| = \mu/\sigma` (bisection in float64);
  in the hard case (:math:`a` orthogonal to the leftmost eigenvectors and the equation without
  a root above :math:`-\lambda_1`) :math:`\mu = -\lambda_1` and the leftmost eigenvector fills the
  norm. Lanczos stops when the sub-problem gradient
  :math:`\|g + Hs + \sigma\|s\|s\|` (from :math:`HQ = QT + \beta q e^\top`, no extra product) is
  below ``rtol`` :math:`\|g\|`.

Both accept any :class:`~secondorder.operators.base.LinearOperator` or a dense symmetric tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secondorder import validation
from secondorder.linalg.lanczos import Lanczos
from secondorder.linalg.probes import Seed, make_generator
from secondorder.linalg.results import SubproblemResult
from secondorder.operators.base import LinearOperator, working_operator


def _vector(A: LinearOperator, g: Tensor, name: str = "g") -> Tensor:
    if not isinstance(g, Tensor) or g.ndim != 1 or g.shape[0] != A.shape[0]:
        shape = list(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"{name} must be a vector [{A.shape[0]}] to match the operator, got {shape}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} has NaN or infinite entries")
    return g.to(A.dtype)


def _to_boundary(s: Tensor, p: Tensor, radius: float) -> float:
    r"""The root :math:`\tau \ge 0` of :math:`\|s + \tau p\| = \Delta` for :math:`\|s\| \le \Delta`."""
    a, b, c = float(p @ p), 2 * float(s @ p), float(s @ s) - radius**2
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return (-b + root) / (2 * a) if b <= 0 else -2 * c / (b + root)


def steihaug(A: LinearOperator | Tensor, g: Tensor, radius: float, *, start: Tensor | None = None,
             rtol: float = 1e-9, maxiter: int = 250) -> SubproblemResult:
    r"""CG-Steihaug for :math:`\min g^\top s + \frac12 s^\top A s` over :math:`\|s\| \le` ``radius``.

    Args:
        A: the (possibly indefinite) symmetric operator or dense tensor.
        g: the gradient ``[P]``.
        radius: the trust-region radius :math:`\Delta > 0`.
        start: the first iterate (inside the ball), e.g. a random vector of norm :math:`0.99\Delta`.
        rtol: stop when :math:`\|\nabla m(s)\| \le` ``rtol`` :math:`\|g\|` (its value at 0; at
            ``start`` when :math:`g = 0`). Xu et al.'s code measures it against the value at the
            start, which a random start of norm :math:`0.99\Delta` inflates by
            :math:`\|Hs_0\|`: with a large radius their CG stops far from the Newton step.
        maxiter: the cap on CG iterations (Xu et al.: 250).

    Returns:
        :class:`~secondorder.linalg.results.SubproblemResult`, ``exit`` one of ``"residual"``,
        ``"boundary"``, ``"negative curvature"``, ``"iterations"``.

    """
    A = working_operator(A)
    g = _vector(A, g)
    radius = validation.positive_finite(radius, "radius")
    validation.tolerance(rtol, "rtol")
    maxiter = validation.positive_int(maxiter, "maxiter")
    used = A.num_matvecs
    with torch.no_grad():
        if start is None:
            s, Hs = torch.zeros_like(g), torch.zeros_like(g)
        else:
            s = _vector(A, start, "start").clone()
            if float(s.norm()) > radius:
                raise ValueError(f"start has norm {float(s.norm()):g}, outside the radius {radius:g}")
            Hs = A @ s
        r = -g - Hs
        rr = float(r @ r)
        stop_at = rtol * (float(g.norm()) or math.sqrt(rr))
        p, exit, it = r.clone(), "residual", 0
        while rr > 0 and math.sqrt(rr) > stop_at:
            if it == maxiter:
                exit = "iterations"
                break
            it += 1
            Hp = A @ p
            kappa = float(p @ Hp)
            alpha = rr / kappa if kappa > 0 else math.inf
            if kappa <= 0 or float((s + alpha * p).norm()) >= radius:
                tau = _to_boundary(s, p, radius)
                s, Hs = s + tau * p, Hs + tau * Hp
                exit = "boundary" if kappa > 0 else "negative curvature"
                break
            s, Hs, r = s + alpha * p, Hs + alpha * Hp, r - alpha * Hp
            rr_new = float(r @ r)
            p = r + (rr_new / rr) * p
            rr = rr_new
        decrease = -float(g @ s + 0.5 * (s @ Hs))
    return SubproblemResult(step=s, model_decrease=decrease, iterations=it, num_matvecs=A.num_matvecs - used,
                            exit=exit)


def cubic_in_eigenbasis(lam: Tensor, a: Tensor, sigma: float) -> Tensor:
    r"""The minimizer :math:`y` of :math:`a^\top y + \frac12\sum_i\lambda_i y_i^2 + \frac\sigma3\|y\|^3`
    (float64, ``lam`` ascending): :math:`y = -a/(\lambda + \mu)` at the root :math:`\mu = \sigma\|y\|`
    of the secular equation, or the hard case's :math:`\mu = -\lambda_1`.
    """
    scale = max(float(lam.abs().max()), float(a.abs().max()), 1e-300)
    low = max(0.0, -float(lam[0]))
    leftmost = (lam - lam[0]).abs() <= 1e-12 * scale

    def excess(mu: float) -> float:  # ||y(mu)|| - mu / sigma, decreasing in mu above -lambda_1
        with torch.no_grad():
            return float((a / (lam + mu)).norm()) - mu / sigma if mu > -float(lam[0]) else math.inf

    if float(a[leftmost].abs().max()) <= 1e-14 * scale and excess(low + 1e-15 * scale) <= 0:
        if low == 0.0:  # no negative curvature: the equation's root is in (0, ...) or y = 0
            if float(a.abs().max()) == 0.0:
                return torch.zeros_like(a)
        else:  # the hard case: mu = -lambda_1, the leftmost eigenvector fills the norm
            y = torch.where(leftmost, torch.zeros_like(a), -a / (lam + low))
            fill = max((low / sigma) ** 2 - float(y @ y), 0.0)
            y[int(leftmost.nonzero()[0])] = math.sqrt(fill)
            return y
    high = low + 1.0
    while excess(high) > 0:
        high = low + 2 * (high - low)
    lo = low
    for _ in range(200):
        mid = 0.5 * (lo + high)
        if mid in (lo, high):
            break
        lo, high = (mid, high) if excess(mid) > 0 else (lo, mid)
    return -a / (lam + high)


def cubic(A: LinearOperator | Tensor, g: Tensor, sigma: float, *, rtol: float = 1e-2, maxiter: int = 250,
          noise: float = 1e-2, seed: Seed = None) -> SubproblemResult:
    r"""The cubic model :math:`\min g^\top s + \frac12 s^\top A s + \frac\sigma3\|s\|^3` by Lanczos.

    Args:
        A: the (possibly indefinite) symmetric operator or dense tensor.
        g: the gradient ``[P]`` (may be zero: the start is then random).
        sigma: the regularization :math:`\sigma > 0`.
        rtol: stop when the sub-problem gradient is below ``rtol`` :math:`\|g\|`.
        maxiter: the cap on Lanczos steps (Xu et al.: 250; at most ``P``).
        noise: the start is :math:`g + ` ``noise`` :math:`\|g\|\xi` (:math:`\xi` a random unit
            vector); 0 starts at :math:`g`, so the Krylov space sees only what :math:`g` sees.
        seed: int, generator or ``None`` (the operator's seed) for :math:`\xi`.

    Returns:
        :class:`~secondorder.linalg.results.SubproblemResult`, ``exit`` ``"gradient"``,
        ``"breakdown"`` (the Krylov space is invariant: the solution there is exact),
        ``"iterations"`` or ``"stationary"`` (zero gradient and no negative curvature found).

    """
    A = working_operator(A)
    g = _vector(A, g)
    sigma = validation.positive_finite(sigma, "sigma")
    validation.tolerance(rtol, "rtol")
    noise = validation.non_negative(noise, "noise")
    m = min(validation.positive_int(maxiter, "maxiter"), A.shape[0])
    used = A.num_matvecs
    with torch.no_grad():
        gnorm = float(g.norm())
        xi = torch.randn(g.shape[0], generator=make_generator(seed, A), dtype=g.dtype, device=g.device)
        v = g + (noise * gnorm if gnorm > 0 else 1.0) * xi / xi.norm()
        run = Lanczos(A, (v / v.norm()).unsqueeze(1), m)
        s, exit, decrease, steps = torch.zeros_like(g), "iterations", 0.0, 0
        for state in run:
            steps = len(state.alphas)
            Q = state.basis[0, :steps]  # [steps, P]
            T = state.tridiagonal(0)
            lam, U = torch.linalg.eigh(T)
            gt = (Q @ g).double().cpu()
            z = U @ cubic_in_eigenbasis(lam, U.T @ gt, sigma)
            s = z.to(g) @ Q
            decrease = -float(gt @ z + 0.5 * (z @ T @ z) + sigma / 3 * float(z.norm()) ** 3)
            grad = g + (T @ z + sigma * float(z.norm()) * z).to(g) @ Q + float(z[-1]) * state.w[:, 0]
            if bool(state.broke[0]):
                exit = "breakdown"
                break
            if gnorm > 0 and float(grad.norm()) <= rtol * gnorm:
                exit = "gradient"
                break
        if gnorm == 0 and decrease == 0.0:
            exit = "stationary"
    return SubproblemResult(step=s, model_decrease=decrease, iterations=steps, num_matvecs=A.num_matvecs - used,
                            exit=exit)
