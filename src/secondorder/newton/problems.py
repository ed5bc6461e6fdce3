r"""Regularized generalized linear models with closed-form derivatives.

Both problems minimize

.. math::

    L(w) = \frac1n \sum_{j=1}^n \ell(x_j^\top w, y_j) + \frac\lambda2 \|w\|^2 ,

with gradient :math:`g = \frac1n X^\top \ell'(Xw, y) + \lambda w` and Hessian

.. math::

    H(w) = A(w)^\top A(w) + \lambda I, \qquad
    A(w) = \operatorname{diag}\big(\sqrt{\ell''(Xw, y)}\big)\, X / \sqrt n \quad (n \times d).

``A(w)`` (:meth:`hessian_factor`) is the *loss-part* Hessian square root used by the sketches of
Dereziński & Mahoney (NeurIPS'19) and Dereziński, Bartan, Pilanci & Mahoney (NeurIPS'20): a
row sketch ``S`` with :math:`E[S^\top S] = I` gives :math:`\hat H = A^\top S^\top S A + \lambda I`
with :math:`E[\hat H] = H`.

* :class:`LogisticRegression`: :math:`\ell(z, y) = \log(1 + e^{-yz})`, labels in {-1, +1},
  :math:`\ell'' = \sigma(yz)\sigma(-yz)`.
* :class:`RidgeRegression`: :math:`\ell(z, y) = (z - y)^2 / 2`, :math:`\ell'' = 1`.

Everything is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from secondorder.linalg.solve import solve
from secondorder.operators.base import Block, LinearOperator

DTYPE = torch.float64


def _as_matrix(features: Tensor) -> Tensor:
    x = torch.as_tensor(features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(
            f"features must be a non-empty 2-D tensor [n, d], got shape {tuple(x.shape)}"
        )
    x = x.to(DTYPE)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(
            f"features contain non-finite values (NaN or inf) in {bad} row(s); "
            "drop or impute those rows first"
        )
    return x


def _as_targets(labels: Tensor, n: int) -> Tensor:
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(
            f"labels must be a 1-D tensor with one entry per row of features ({n}), "
            f"got shape {tuple(y.shape)}"
        )
    y = y.to(DTYPE)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("labels contain non-finite values (NaN or inf)")
    return y


def check_lam(lam: float) -> float:
    """``lam`` (the L2 regularizer) as a float, if it is positive and finite."""
    lam = float(lam)
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam (the L2 regularizer) must be a positive finite number, got {lam}")
    return lam


def _checked_weights(dim: int, w: Tensor) -> Tensor:
    w = torch.as_tensor(w, dtype=DTYPE)
    if w.shape != (dim,):
        raise ValueError(f"w must have shape ({dim},), got {tuple(w.shape)}")
    return w


def as_weights(dim: int, w: Tensor | None) -> Tensor:
    """``w`` as a new float64 [dim] vector (zeros when None), e.g. a starting point."""
    return torch.zeros(dim, dtype=DTYPE) if w is None else _checked_weights(dim, w).clone()


@dataclass(frozen=True)
class GLMProblem:
    r"""Base class: ``features`` X [n, d], ``labels`` y [n], regularizer ``lam`` > 0.

    Subclasses define the per-example loss :math:`\ell(z, y)` and its first two derivatives
    in :math:`z = x^\top w`.
    """

    features: Tensor
    labels: Tensor
    lam: float

    def __post_init__(self) -> None:
        x = _as_matrix(self.features)
        object.__setattr__(self, "features", x)
        object.__setattr__(self, "labels", _as_targets(self.labels, x.shape[0]))
        object.__setattr__(self, "lam", check_lam(self.lam))

    @property
    def num_samples(self) -> int:
        """n, the number of rows."""
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """d, the number of features."""
        return self.features.shape[1]

    # per-example loss and derivatives in z = x^T w; overridden by subclasses
    def _loss_terms(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _first_derivative(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _second_derivative(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def subset(self, rows: Tensor) -> "GLMProblem":
        """The same problem on the rows ``rows`` only (a data shard), with the same λ."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return type(self)(self.features[idx], self.labels[idx], self.lam)

    def loss_sums(self, points: Tensor) -> Tensor:
        r""":math:`\sum_j \ell(x_j^\top w, y_j)` for each row w of ``points`` [J, d] (no 1/n, no λ)."""
        return self._loss_terms(points @ self.features.T).sum(dim=1)

    def gradient_sum(self, w: Tensor) -> Tensor:
        r""":math:`\sum_j \ell'(x_j^\top w, y_j)\,x_j` (no 1/n, no λ)."""
        return self.features.T @ self._first_derivative(self.features @ w)

    def losses(self, points: Tensor) -> Tensor:
        """:math:`L(w)` for each row w of ``points`` [J, d], in one pass over the data."""
        points = torch.as_tensor(points, dtype=DTYPE)
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"points must be [J, {self.dim}], got {tuple(points.shape)}")
        return self.objective(self.loss_sums(points), points, self.num_samples)

    def objective(self, loss_sums: Tensor, points: Tensor, num_samples: int) -> Tensor:
        r""":math:`L = \frac1n\sum_j\ell_j + \frac\lambda2\|w\|^2` from the data terms' sums over
        ``num_samples`` rows (this problem's, or all shards' after an all-reduce).
        """
        return loss_sums / num_samples + 0.5 * self.lam * (points**2).sum(dim=1)

    def objective_gradient(self, gradient_sum: Tensor, w: Tensor, num_samples: int) -> Tensor:
        r""":math:`g = \frac1n\sum_j\ell'_j x_j + \lambda w` from the data terms' sum over ``num_samples`` rows."""
        return gradient_sum / num_samples + self.lam * w

    def loss(self, w: Tensor) -> float:
        r""":math:`L(w) = \frac1n\sum_j \ell(x_j^\top w, y_j) + \frac\lambda2\|w\|^2`."""
        return float(self.losses(_checked_weights(self.dim, w)[None])[0])

    def gradient(self, w: Tensor) -> Tensor:
        r""":math:`g = \frac1n X^\top \ell'(Xw, y) + \lambda w`."""
        w = _checked_weights(self.dim, w)
        return self.objective_gradient(self.gradient_sum(w), w, self.num_samples)

    def curvatures(self, w: Tensor) -> Tensor:
        r""":math:`\ell''(x_j^\top w, y_j)` for every row j (shape [n], non-negative)."""
        w = _checked_weights(self.dim, w)
        return self._second_derivative(self.features @ w)

    def hessian_factor(self, w: Tensor) -> Tensor:
        r""":math:`A(w) = \operatorname{diag}(\sqrt{\ell''})X/\sqrt n`, so that ``H = AᵀA + λI``."""
        c = self.curvatures(w)
        return self.features * (c.clamp_min(0.0).sqrt() / math.sqrt(self.num_samples))[:, None]

    def hessian_product(self, w: Tensor, V: Tensor) -> Tensor:
        r""":math:`H(w)V = \frac1n X^\top(\ell'' \odot XV) + \lambda V` for V [d] or [d, K], matrix-free."""
        c = self.curvatures(w)
        XV = self.features @ V
        return self.features.T @ (c.reshape(-1, *([1] * (XV.ndim - 1))) * XV) / self.num_samples + self.lam * V

    def hessian(self, w: Tensor) -> Tensor:
        r""":math:`H(w) = A(w)^\top A(w) + \lambda I` (d x d)."""
        a = self.hessian_factor(w)
        return a.T @ a + self.lam * torch.eye(self.dim, dtype=DTYPE)


@dataclass(frozen=True)
class LogisticRegression(GLMProblem):
    r"""L2-regularized logistic regression, :math:`\ell(z, y) = \log(1 + e^{-yz})`, y in {-1, +1}."""

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = torch.unique(self.labels[(self.labels != 1) & (self.labels != -1)])
        if bad.numel():
            shown = ", ".join(f"{v:g}" for v in bad[:5].tolist())
            raise ValueError(
                f"logistic regression labels must be -1 or +1; found {shown}"
                + (" ..." if bad.numel() > 5 else "")
                + " (map {0, 1} labels with y = 2 * y - 1)"
            )

    def _loss_terms(self, z: Tensor) -> Tensor:
        return torch.nn.functional.softplus(-self.labels * z)

    def _first_derivative(self, z: Tensor) -> Tensor:
        return -self.labels * torch.sigmoid(-self.labels * z)

    def _second_derivative(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z) * torch.sigmoid(-z)


@dataclass(frozen=True)
class RidgeRegression(GLMProblem):
    r"""Ridge regression, :math:`\ell(z, y) = (z - y)^2 / 2` (a quadratic: H does not depend on w)."""

    def _loss_terms(self, z: Tensor) -> Tensor:
        return 0.5 * (z - self.labels) ** 2

    def _first_derivative(self, z: Tensor) -> Tensor:
        return z - self.labels

    def _second_derivative(self, z: Tensor) -> Tensor:
        return torch.ones_like(z)


def effective_dimension(factor: Tensor, lam: float) -> float:
    r""":math:`d_\lambda = \operatorname{tr}(A^\top A (A^\top A + \lambda I)^{-1})
    = \sum_i \sigma_i^2 / (\sigma_i^2 + \lambda)`, for the factor A [n, d].
    """
    a = torch.as_tensor(factor, dtype=DTYPE)
    if a.ndim != 2:
        raise ValueError(f"factor must be a 2-D tensor [n, d], got shape {tuple(a.shape)}")
    return gram_effective_dimension(a.T @ a, lam)


def gram_effective_dimension(gram: Tensor, lam: float) -> float:
    r""":math:`d_\lambda = \sum_i \mu_i/(\mu_i + \lambda)` over the eigenvalues μ of the Gram
    matrix :math:`A^\top A` (d x d; what a data-parallel run can all-reduce).
    """
    lam = check_lam(lam)
    mu = torch.linalg.eigvalsh(torch.as_tensor(gram, dtype=DTYPE)).clamp_min(0.0)
    return float((mu / (mu + lam)).sum())


@dataclass(frozen=True)
class NewtonResult:
    """Exact Newton's output: the minimizer ``w``, ``||∇L(w)||``, iterations, convergence flag."""

    w: Tensor
    gradient_norm: float
    iterations: int
    converged: bool


class Objective(Protocol):
    """What Newton's method needs of a problem: a :class:`GLMProblem`, or an engine's
    :class:`~secondorder.newton.engine.Cluster` whose quantities are sums over machines.
    """

    dim: int

    def gradient(self, w: Tensor) -> Tensor: ...

    def losses(self, points: Tensor) -> Tensor: ...

    def hessian(self, w: Tensor) -> Tensor: ...


def armijo_step(
    problem: Objective,
    w: Tensor,
    direction: Tensor,
    gradient: Tensor,
    *,
    c: float = 1e-4,
    shrink: float = 0.5,
    max_halvings: int = 60,
) -> float:
    r"""Largest :math:`\eta \in \{1, s, s^2, ...\}` with the Armijo condition
    :math:`L(w - \eta p) \le L(w) - c\,\eta\, g^\top p` for the step ``w - η p``.

    All trial points and ``w`` are evaluated in one batched ``problem.losses`` call (one
    all-reduce on a data-parallel problem), so every rank picks the same η. The comparison allows
    a round-off slack of :math:`64\,\epsilon_{mach}\max(1, |L(w)|)` so that steps at the optimum
    are not rejected for decreases below machine precision. Returns 0.0 when no step satisfies the
    condition (``p`` is not a descent direction).
    """
    etas = shrink ** torch.arange(max_halvings, dtype=DTYPE)
    values = problem.losses(torch.cat([w[None], w[None] - etas[:, None] * direction[None]]))
    f0, trial = float(values[0]), values[1:]
    slack = 64 * torch.finfo(DTYPE).eps * max(1.0, abs(f0))
    ok = trial <= f0 - c * etas * float(gradient @ direction) + slack
    return float(etas[ok][0]) if bool(ok.any()) else 0.0


class HessianAt(LinearOperator):
    """:math:`H(w)` of a GLM problem as a matrix-free operator (products by
    :meth:`GLMProblem.hessian_product`), for the curvature core's solvers and eigensolvers.
    """

    def __init__(self, problem: GLMProblem, w: Tensor):
        self.problem, self.w = problem, _checked_weights(problem.dim, w)
        self.shape = (problem.dim, problem.dim)
        self.dtype, self.device = DTYPE, torch.device("cpu")
        self.blocks = (Block("w", 0, problem.dim),)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.problem.hessian_product(self.w, V)


SOLVERS = ("exact", "cg")


def newton_solve(
    problem: Objective,
    w0: Tensor | None = None,
    *,
    tol: float = 1e-12,
    max_iter: int = 100,
    solver: str = "exact",
) -> NewtonResult:
    r"""Damped Newton, :math:`w \leftarrow w - \eta p` with :math:`p \approx H^{-1} g` and Armijo
    backtracking, until :math:`\|\nabla L(w)\| \le` ``tol``. Starts from ``w0`` (default 0).

    ``solver="exact"`` solves with the dense Hessian; ``"cg"`` is Newton-CG (truncated Newton,
    Nocedal & Wright §7.1): conjugate gradients on matrix-free Hessian-vector products to the
    relative residual :math:`\min(0.5, \sqrt{\|g\|})`, superlinear near the optimum.
    """
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    w = as_weights(problem.dim, w0)
    g = problem.gradient(w)
    for it in range(max_iter + 1):
        gnorm = float(g.norm())
        if gnorm <= tol:
            return NewtonResult(w, gnorm, it, True)
        if it == max_iter:
            break
        if solver == "exact":
            p = torch.linalg.solve(problem.hessian(w), g)
        elif isinstance(problem, GLMProblem):
            p = solve(HessianAt(problem, w), g, tol=min(0.5, math.sqrt(gnorm))).solution
        else:
            raise ValueError("solver='cg' needs a GLMProblem (matrix-free Hessian products); use solver='exact'")
        eta = armijo_step(problem, w, p, g)
        if eta == 0.0:
            break
        w = w - eta * p
        g = problem.gradient(w)
    return NewtonResult(w, float(g.norm()), it, False)
