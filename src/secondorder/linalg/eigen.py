r"""Extreme eigenpairs of a symmetric operator.

* ``method="lanczos"`` (default): thick-restart band Lanczos (block Lanczos, Golub & Underwood
  1977, built one column at a time as in Ruhe 1979; thick restart, Wu & Simon 2000, equivalent
  to implicitly restarted Lanczos, Sorensen 1992) with full reorthogonalization (two passes of
  classical Gram-Schmidt), from a random block of ``block_size`` vectors (default ``k``, tried
  from a block of 2 first: :meth:`Problem.escalating`). Each
  cycle extends the basis to ``ncv`` vectors, takes the Ritz pairs of :math:`T = V^\top A V` after
  every step, and stops as soon as every wanted Ritz pair has residual
  :math:`\|A y - \theta y\| = \|C s\| \le \mathrm{tol}\cdot\|A\|` (:math:`C` the coupling to the
  ``block_size`` pending vectors; :math:`\|A\|` estimated by the largest Ritz value in magnitude).
  Otherwise it keeps the best ``k + (ncv - k) // 2`` Ritz vectors plus the pending block and
  continues (the arrowhead restart).
* ``method="power"``: block power (subspace) iteration with Rayleigh-Ritz, one batched product of
  ``k`` vectors per iteration, stopping on the same residual test; for ``which`` other than
  ``"magnitude"`` it runs on the spectrally shifted :math:`A + cI` or :math:`cI - A`.

Repeated eigenvalues: the Krylov space of one vector holds one copy of each eigenvalue in exact
arithmetic, whatever its multiplicity; a random block of ``b`` vectors holds ``b`` copies
(generically). A residual certifies that a value is an eigenvalue, never that no copy was missed,
so pairs ranked after a value found ``b`` times are reported ``converged=False``.

``which``: ``"largest"`` and ``"smallest"`` are algebraic (the sharpness is the largest);
``"magnitude"`` is the largest :math:`|\lambda|`, which is what PyHessian's power iteration returns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Generator, Sequence, cast

import torch
from torch import Tensor

from secondorder.linalg.probes import Seed, make_generator
from secondorder.linalg.progress import ticking
from secondorder.linalg.results import EigenResult
from secondorder.operators.base import LOW_PRECISION, LinearOperator, working_operator
from secondorder.validation import positive_int, tolerance

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
    """1e-10 for float64 products, 1e-5 for float32, 8 unit roundoffs for float16/bfloat16 (0.0078, 0.0625)."""
    if dtype in LOW_PRECISION:
        return 8 * torch.finfo(dtype).eps
    return 1e-10 if dtype == torch.float64 else 1e-5


def checked_tol(tol: float | None, dtype: torch.dtype) -> float:
    """``tol``, or the default of products in ``dtype``; a tolerance below their unit roundoff is refused."""
    if tol is None:
        return _default_tol(dtype)
    tol, eps = tolerance(tol), torch.finfo(dtype).eps
    if tol < eps:
        raise ValueError(f"tol={tol:g} is below what {str(dtype).removeprefix('torch.')} products resolve (unit "
                         f"roundoff {eps:.2g}): no residual could certify it; pass tol >= {eps:.2g} or compute "
                         "in a wider dtype")
    return tol


def _verified(solver: Solver, tol: float) -> Solver:
    """``solver``, its pairs then checked by explicit products ``A Y`` (``k`` more).

    For products rounded to float16/bfloat16 the recurrence's residuals describe the rounded
    products, not ``A``: they fall below the rounding error itself (they reached 0 in bfloat16).
    The explicit residual ``||A y - theta y||`` carries that error, so it is what is reported
    (the larger of the two) and what certifies convergence.
    """
    run = yield from solver
    Y = run.eigenvectors
    AY = yield Y
    explicit = (AY - Y * run.eigenvalues.to(dtype=Y.dtype, device=Y.device)).norm(dim=0).double().cpu()
    return replace(run, residuals=torch.maximum(run.residuals.double().cpu(), explicit),
                   converged=run.converged & (explicit <= tol * run.norm), num_matvecs=run.num_matvecs + Y.shape[1])


@dataclass(frozen=True)
class _Run:
    """What one solver hands back: eigenpairs sorted for ``which``, their residuals and tests,
    the products spent (columns), the restarts, the residual history and the norm estimate.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
    num_restarts: int
    history: tuple[tuple[float, ...], ...]
    norm: float
    block_size: int | None = None
    """The start block the run certifies ranks with, where not the problem's (:meth:`Problem.escalating`)."""


# A solver is a generator: it yields the block X [p, c] it wants multiplied, is sent A X, and
# returns a _Run. One driver (``lockstep``) then serves one problem or many at once.
Solver = Generator[Tensor, Tensor, _Run]


def lockstep(A: LinearOperator, problems: Sequence[tuple[slice, Solver]]) -> list[_Run]:
    """Run solvers together, each on the diagonal block ``A[rows, rows]`` of its ``rows``.

    Every round stacks the blocks the solvers ask for into one ``[P, L]`` product (each column
    zero outside its solver's rows) and hands each solver the rows of its block: ``L`` matvecs
    but one product call (one data pass for a curvature operator). Finished solvers drop out.
    """
    P = A.shape[0]
    runs: list[_Run | None] = [None] * len(problems)
    asks = {i: next(solver) for i, (_, solver) in enumerate(problems)}
    while asks:
        V = torch.zeros(P, sum(X.shape[1] for X in asks.values()), dtype=A.dtype, device=A.device)
        cols, c = {}, 0
        for i, X in asks.items():
            cols[i] = slice(c, c + X.shape[1])
            V[problems[i][0], cols[i]] = X
            c += X.shape[1]
        AV = A @ V
        for i in list(asks):
            rows, solver = problems[i]
            try:
                asks[i] = solver.send(AV[rows, cols[i]])
            except StopIteration as stop:
                runs[i] = stop.value
                del asks[i]
    return cast(list[_Run], runs)  # every solver has returned


def _random_block(p: int, b: int, gen, dtype: torch.dtype, device) -> Tensor:
    """``b`` orthonormal Gaussian directions in R^p (drawn in float64 from ``gen``)."""
    X = torch.randn(p, b, generator=gen, device=gen.device, dtype=torch.float64)
    return torch.linalg.qr(X)[0].to(device=device, dtype=dtype)


def basis_size(p: int, k: int, ncv: int | None, b: int) -> int:
    """The Lanczos basis size ``min(p, ncv or max(2k + 10, 20) + 8 (b - 1))``; it must exceed ``k``.

    A block Krylov space of ``n`` columns holds polynomials of degree ``n / b`` only, so the
    default grows with the block (measured in benchmarks/README.md).
    """
    m = min(p, ncv or max(2 * k + 10, 20) + 8 * (b - 1))
    if m <= k:
        raise ValueError(f"ncv must exceed k; got ncv={m}, k={k}")
    return m


def lanczos(p: int, k: int, which: str, tol: float, max_matvecs: int, ncv: int | None, b: int, gen,
            dtype: torch.dtype, device) -> Solver:
    r"""Thick-restart band Lanczos on a ``p x p`` symmetric matrix, one product per step.

    Band Lanczos (Ruhe 1979) builds the block Krylov space of a random ``[p, b]`` start block
    (block Lanczos, Golub & Underwood 1977) one column at a time: step ``j`` multiplies
    :math:`q_j` and orthogonalizes :math:`A q_j` against all ``j + b`` basis vectors (full
    reorthogonalization), which gives column ``j + b``. After ``n`` steps
    :math:`A Q_n = Q_n T_n + Q_{n:n+b} C` with :math:`T_n = Q_n^	op A Q_n` (band width ``b``), so
    a Ritz pair :math:`(	heta, Q_n s)` of :math:`T_n` has residual :math:`\|C s\|`. With ``b = 1``
    this is ordinary Lanczos. A Krylov space of one vector holds one copy of each eigenvalue in
    exact arithmetic; with a block of ``b`` random vectors, generically ``b`` copies. The thick
    restart (Wu & Simon 2000) keeps the best ``k + (ncv - k) // 2`` Ritz vectors and the ``b``
    pending ones, with the coupling :math:`C S` as the arrowhead of the new ``T``.
    """
    m = basis_size(p, k, ncv, b)
    eps = torch.finfo(dtype).eps
    V = torch.zeros(p, m + b, dtype=dtype, device=device)
    T = torch.zeros(m + b, m + b, dtype=torch.float64)
    V[:, :b] = _random_block(p, b, gen, dtype, device)
    start, matvecs, restarts, anorm = 0, 0, 0, 0.0
    history: list[tuple[float, ...]] = []
    while True:
        for j in range(start, m):
            w = (yield V[:, j : j + 1])[:, 0]
            matvecs += 1
            top = j + b  # the column this step creates
            w, h = _orthogonalize(w, V[:, :top])
            h64 = h.double().cpu()
            T[:top, j] = h64
            T[j, :top] = h64
            beta = float(w.norm())
            anorm = max(anorm, float(h64.abs().max()), beta)
            fresh = beta <= 100 * eps * max(anorm, 1e-300) and top < p
            if fresh:
                # invariant subspace found: continue with a fresh direction orthogonal to the basis
                w = _orthogonalize(_random_block(p, 1, gen, dtype, device)[:, 0], V[:, :top])[0]
                beta_T = 0.0
            elif top >= p:
                w, beta_T = torch.zeros_like(w), 0.0
            else:
                beta_T = beta
            T[top, j] = T[j, top] = beta_T
            nrm = w.norm()
            V[:, top] = w / nrm if nrm > 0 else w
            n = j + 1
            if n < k or (fresh and n < m):
                # after a breakdown every Ritz pair has residual 0, but the fresh direction may
                # still add copies of a repeated eigenvalue: extend before testing convergence
                continue
            # Rayleigh-Ritz on the current basis after every step (a small n x n eigh)
            theta, S = torch.linalg.eigh(T[:n, :n])
            anorm = max(anorm, float(theta.abs().max()))
            order = _order(theta, which)
            residuals = (T[n : n + b, :n] @ S[:, order]).norm(dim=0)
            history.append(tuple(residuals[:k].tolist()))
            converged = residuals[:k] <= tol * anorm
            if bool(converged.all()) or matvecs >= max_matvecs:
                Y = V[:, :n] @ S[:, order[:k]].to(dtype=dtype, device=device)
                return _Run(theta[order[:k]], Y, residuals[:k], converged, matvecs, restarts, tuple(history), anorm)
        keep = min(m - 1, k + (m - k) // 2)
        idx = order[:keep]
        coupling = T[m : m + b, :m] @ S[:, idx]
        V[:, :keep] = V[:, :m] @ S[:, idx].to(dtype=dtype, device=device)
        V[:, keep : keep + b] = V[:, m : m + b].clone()
        T.zero_()
        T[:keep, :keep] = torch.diag(theta[idx])
        T[keep : keep + b, :keep] = coupling
        T[:keep, keep : keep + b] = coupling.T
        start, restarts = keep, restarts + 1


def _subspace(p: int, k: int, tol: float, max_matvecs: int, gen, which: str, shift: float, sign: float,
              dtype: torch.dtype, device, X: Tensor | None = None) -> Solver:
    """Block power iteration on ``B = sign * A + shift * I`` from the block ``X`` or a random one."""
    X = _random_block(p, k, gen, dtype, device) if X is None else torch.linalg.qr(X)[0]
    matvecs, history = 0, []
    while True:
        BX = sign * (yield X) + shift * X
        matvecs += k
        theta, S = torch.linalg.eigh((X.T @ BX).double().cpu())
        theta, S = theta.flip(0), S.flip(1)  # dominant first
        S = S.to(dtype=dtype, device=device)
        X, BX = X @ S, BX @ S
        residuals = (BX - X * theta.to(dtype).to(device)).norm(dim=0).double().cpu()
        lam = (theta - shift) / sign
        history.append(tuple(residuals.tolist()))
        anorm = float(lam.abs().max())
        converged = residuals <= tol * max(anorm, 1e-300)
        if bool(converged.all()) or matvecs >= max_matvecs:
            order = _order(lam, which)
            return _Run(lam[order], X[:, order], residuals[order], converged[order], matvecs, len(history) - 1,
                        tuple(history), anorm)
        X, _ = torch.linalg.qr(BX)


def power(p: int, k: int, which: str, tol: float, max_matvecs: int, gen, dtype: torch.dtype, device) -> Solver:
    r"""Block power iteration within ``max_matvecs`` products.

    For "largest" ("smallest"): iterate on A itself with half the budget; if the k dominant
    eigenvalues all have the wanted sign they are the wanted ones (the usual case for the top of
    a Hessian), and the iteration continues from that block with the rest of the budget.
    Otherwise shift, :math:`\pm A + 1.05\rho I` with ρ the dominant magnitude seen, so the
    wanted end dominates, and spend the rest there.
    """
    if which == "magnitude":
        return (yield from _subspace(p, k, tol, max_matvecs, gen, which, 0.0, 1.0, dtype, device))
    sign = 1.0 if which == "largest" else -1.0
    first = yield from _subspace(p, k, tol, max(k, max_matvecs // 2), gen, which, 0.0, 1.0, dtype, device)
    left = max(k, max_matvecs - first.num_matvecs)
    if bool((sign * first.eigenvalues > 0).all()):
        if bool(first.converged.all()) or first.num_matvecs >= max_matvecs:
            return first
        out = yield from _subspace(p, k, tol, left, gen, which, 0.0, 1.0, dtype, device, X=first.eigenvectors)
    else:
        radius = 1.05 * float(first.eigenvalues.abs().max())
        out = yield from _subspace(p, k, tol, left, gen, which, radius, sign, dtype, device)
    return replace(out, num_matvecs=out.num_matvecs + first.num_matvecs,
                   num_restarts=out.num_restarts + first.num_restarts + 1, history=first.history + out.history)


def uncertified(theta: Tensor, block_size: int, resolution: float) -> Tensor:
    """Pairs whose rank a residual check cannot certify: those ranked after a value found
    ``block_size`` times or more (copies within ``resolution``). A block of ``b`` vectors finds,
    generically, at most ``b`` copies of an eigenvalue (one vector: one copy), so when the result
    holds that many, further copies may exist and belong before the later pairs.
    """
    close = (theta[:, None] - theta[None, :]).abs() <= resolution
    full = close.sum(1) >= block_size  # [i]: theta_i reached the block's multiplicity
    rank = torch.arange(theta.numel())
    after = (rank[None, :] > rank[:, None]) & ~close  # [i, j]: j ranks after the copies of theta_i
    return (full[:, None] & after).any(0)


def dense(p: int, k: int, which: str, dtype: torch.dtype, device) -> Solver:
    """All eigenpairs of a small ``p x p`` matrix from one product with the identity (``p`` columns)."""
    M = (yield torch.eye(p, dtype=dtype, device=device)).double()
    theta, S = torch.linalg.eigh((M + M.T) / 2)
    idx = _order(theta, which)[:k]
    vectors = S[:, idx]
    residuals = (M @ vectors - vectors * theta[idx]).norm(dim=0)
    return _Run(theta[idx], vectors.to(dtype), residuals, torch.ones(len(idx), dtype=torch.bool), p, 0, (),
                float(theta.abs().max()))


def default_block_size(k: int, ncv: int | None, method: str) -> int:
    """``k`` (every copy of the wanted set), or with an explicit Lanczos ``ncv``
    ``min(k, max(2, (ncv - k) // 4))``: a restart cycle adds ``(ncv - k) / 2`` columns, which should
    be about two blocks, but one vector certifies no multiplicity at all (see :func:`uncertified`).
    """
    return k if ncv is None or method == "power" else min(k, max(2, (ncv - k) // 4))


@dataclass(frozen=True)
class Problem:
    """The validated arguments of one eigenvalue problem of size ``p``: builds its solver and
    turns the solver's run into an :class:`EigenResult`.
    """

    p: int
    k: int
    which: str
    tol: float
    method: str
    max_matvecs: int
    ncv: int | None
    block_size: int
    verify: bool = False
    """Whether the products are float16/bfloat16, so that convergence is checked by :func:`_verified`."""
    escalate: bool = False
    """Solve from a block of 2 first (:meth:`escalating`): Lanczos, ``k > 2``, block and ``ncv`` defaulted."""

    @classmethod
    def checked(cls, p: int, k: int, which: str, tol: float | None, method: str, max_matvecs: int | None,
                ncv: int | None, block_size: int | None, dtype: torch.dtype) -> Problem:
        """Validate the arguments of :func:`eigenvalues` and fill in the defaults (``dtype``: the products')."""
        if which not in _WHICH:
            raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
        if not isinstance(k, int) or not 1 <= k < p:
            raise ValueError(f"k must be an integer with 1 <= k < P = {p}, got {k!r}; for all eigenvalues use torch.linalg.eigvalsh on A.to_dense()")
        if method not in ("lanczos", "power"):
            raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
        tol = checked_tol(tol, dtype)
        max_matvecs = max(500, 50 * k) if max_matvecs is None else positive_int(max_matvecs, "max_matvecs")
        defaulted = block_size is None
        block_size = default_block_size(k, ncv, method) if block_size is None else block_size
        if not isinstance(block_size, int) or not 1 <= block_size <= k:
            raise ValueError(f"block_size must be an integer with 1 <= block_size <= k = {k}, got {block_size!r}")
        if method == "power" and block_size != k:
            raise ValueError(f"the power method iterates a block of k = {k} vectors; got block_size={block_size}")
        escalate = defaulted and ncv is None and method == "lanczos" and k > 2
        return cls(p, k, which, tol, method, max_matvecs, ncv, block_size, dtype in LOW_PRECISION, escalate)

    @classmethod
    def small(cls, p: int, k: int, which: str, dtype: torch.dtype) -> Problem:
        """A block solved densely: every eigenpair, so every copy (``block_size = p``)."""
        return cls(p, min(k, p), which, _default_tol(dtype), "dense", p, None, p, dtype in LOW_PRECISION)

    def solver(self, gen, dtype: torch.dtype, device) -> Solver:
        """A fresh solver of ``method`` drawing its start from ``gen`` (``dtype``: the working one)."""
        if self.escalate:
            return self.escalating(gen, dtype, device)
        if self.method == "dense":
            solver = dense(self.p, self.k, self.which, dtype, device)
        elif self.method == "lanczos":
            solver = lanczos(self.p, self.k, self.which, self.tol, self.max_matvecs, self.ncv, self.block_size, gen,
                             dtype, device)
        else:
            solver = power(self.p, self.k, self.which, self.tol, self.max_matvecs, gen, dtype, device)
        return _verified(solver, self.tol) if self.verify else solver

    def escalating(self, gen, dtype: torch.dtype, device) -> Solver:
        """Lanczos from a block of 2, and, only where that run holds a value twice (so a further copy
        may be missing, :func:`uncertified`) and budget is left, again from this problem's block of
        ``k``. One solver to the lockstep driver; the run says which block certifies its ranks.
        On the top 5 of a trained MLP's Hessian: 29 products instead of 50 from a block of 5.
        """
        narrow = replace(self, block_size=2, escalate=False)
        run = yield from narrow.solver(gen, dtype, device)
        left = self.max_matvecs - run.num_matvecs
        if left <= 0 or not bool((run.converged & narrow.unranked(run)).any()):
            return replace(run, block_size=2)
        again = yield from replace(self, max_matvecs=left, escalate=False).solver(gen, dtype, device)
        return replace(again, num_matvecs=run.num_matvecs + again.num_matvecs, history=run.history + again.history,
                       num_restarts=run.num_restarts + again.num_restarts + 1)

    def unranked(self, run: _Run) -> Tensor:
        """The pairs of ``run`` whose rank its start block cannot certify (:func:`uncertified`)."""
        return uncertified(run.eigenvalues, run.block_size or self.block_size, self.tol * run.norm)

    def result(self, run: _Run, dtype: torch.dtype) -> EigenResult:
        """The EigenResult of ``run``: ``converged`` where the residual passed and the rank is certified."""
        return EigenResult(
            eigenvalues=run.eigenvalues.to(dtype), eigenvectors=run.eigenvectors, residuals=run.residuals.to(dtype),
            converged=run.converged & ~self.unranked(run), num_matvecs=run.num_matvecs,
            num_restarts=run.num_restarts, which=self.which, method=self.method, residual_history=run.history,
            block_size=run.block_size or self.block_size,
        )


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
    block_size: int | None = None,
) -> EigenResult:
    """The ``k`` extreme eigenpairs of a symmetric operator, certified by their residuals.

    Args:
        A: a symmetric operator or dense tensor.
        k: number of eigenpairs, ``1 <= k < P``.
        which: ``"largest"`` / ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative residual tolerance, ``||Av - theta v|| <= tol * ||A||``, finite, below 1 and
            not below the products' unit roundoff (default 1e-10 in float64, 1e-5 in float32, 8 unit
            roundoffs in float16/bfloat16: eigenvalue errors are about ``residual^2 / gap``).
            float16/bfloat16 operators: products run in their dtype, the recurrence in float32,
            and the final pairs are checked by explicit products (``k`` more; see :func:`_verified`).
        method: ``"lanczos"`` (thick restart) or ``"power"`` (block power iteration).
        max_matvecs: budget (default ``max(500, 50 k)``); unconverged pairs have ``converged=False``.
        ncv: Lanczos basis size (default ``max(2k + 10, 20) + 8 (block_size - 1)``, capped at P).
        seed: int, generator or ``None``.
        progress: show a progress bar of the products (up to ``max_matvecs``) on stderr.
        block_size: Lanczos start block ``b``, ``1 <= b <= k``: eigenvalues of multiplicity up to
            ``b`` are found with all their copies. Default: ``k``, solved from a block of 2 first
            and from a block of ``k`` only if that result holds a value twice (a further copy may be
            missing; the products of both runs count); with an explicit ``ncv``,
            ``min(k, max(2, (ncv - k) // 4))``. The power method always iterates ``k`` vectors.

    Returns:
        :class:`EigenResult`, eigenvalues sorted from most to least wanted. With ``b < k``, pairs
        ranked after a value found ``b`` times have ``converged=False`` (further copies may exist).

    """
    A = working_operator(A)
    P = A.shape[0]
    problem = Problem.checked(P, k, which, tol, method, max_matvecs, ncv, block_size, A.product_dtype)
    gen = make_generator(seed, A)
    with ticking(A, progress, problem.max_matvecs, f"eigenvalues ({method})") as op, torch.no_grad():
        (run,) = lockstep(op, [(slice(0, P), problem.solver(gen, A.dtype, A.device))])
    return problem.result(run, A.dtype)
