r"""Row sketches of a Hessian square root A (n x d) for sketched / distributed Newton.

Every sketch returns the sketched rows :math:`\tilde A = SA` of a random ``S`` normalized so that
:math:`E[S^\top S] = I`, hence :math:`E[\tilde A^\top \tilde A] = A^\top A` and
:math:`\hat H = \tilde A^\top\tilde A + \lambda I` is an unbiased Hessian estimate.

* :func:`uniform_sketch`: m i.i.d. rows, :math:`p_i = 1/n`, each scaled by :math:`1/\sqrt{m p_i}`.
* :func:`leverage_sketch`: m i.i.d. rows with :math:`p_i \propto a_i^\top(A^\top A+\lambda I)^{-1}a_i`.
* :func:`poisson_sketch`: a Poisson(m) number of i.i.d. rows (equivalently, independent
  Poisson(m p_i) counts per row). Independent per-row counts make the determinantal identity of
  Dereziński & Mahoney (NeurIPS'19) exact: :math:`E[\det(\hat H)\hat H^{-1}]/E[\det\hat H] = H^{-1}`.
* :func:`gaussian_sketch`: S with i.i.d. N(0, 1/m) entries.
* :func:`less_sketch`: LESS embeddings (Dereziński, Liao, Dobriban & Mahoney, "Sparse sketches
  with small inversion bias", COLT 2021): each of the m rows of S has s non-zeros at positions
  drawn i.i.d. from the ridge leverage distribution p, valued :math:`\pm 1/\sqrt{m s p_i}`
  with independent signs. Cost O(m s d); inversion bias about :math:`\sqrt d/m` instead of the
  d/m of row sampling.
* :func:`surrogate_sketch`: the surrogate of the Poissonized row sketch (Dereziński, Bartan,
  Pilanci & Mahoney, NeurIPS'20): Poisson(m - d_λ) i.i.d. rows plus one draw of the ridge
  L-ensemble DPP with kernel :math:`L = AA^\top/\lambda` (:class:`RidgeDPP`), all rows scaled by
  :math:`1/\sqrt{m p_i}`. With :math:`\lambda' = \lambda(1 - d_\lambda/m)` it is exactly
  unbiased after rescaling: :math:`(1 - d_\lambda/m)\,E[(\tilde A^\top\tilde A + \lambda' I)^{-1}]
  = (A^\top A + \lambda I)^{-1}`. (It is *not* unbiased for H itself.)

All randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from secondorder.newton.problems import DTYPE, check_lam, effective_dimension
from secondorder.validation import positive_int

ROW_DISTRIBUTIONS = ("uniform", "leverage")


@dataclass(frozen=True)
class RowSketch:
    """Sketched rows ``rows`` = SA ([r, d]); ``indices`` [r] of the sampled rows of A (``None``
    for dense sketches); ``dpp_indices`` the DPP part of a surrogate sketch (else ``None``).
    """

    rows: Tensor
    indices: Tensor | None = None
    dpp_indices: Tensor | None = None

    @property
    def gram(self) -> Tensor:
        r""":math:`\tilde A^\top \tilde A` (d x d)."""
        return self.rows.T @ self.rows


def _check_factor(factor: Tensor) -> Tensor:
    a = torch.as_tensor(factor)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"factor A must be a non-empty 2-D tensor [n, d], got {tuple(a.shape)}")
    a = a.to(DTYPE)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("factor A contains non-finite values (NaN or inf)")
    return a


def check_sketch_size(m: int, d: int) -> int:
    """The sketch size ``m`` as an ``int`` above the dimension ``d`` (clear error otherwise)."""
    if isinstance(m, bool) or int(m) != m:
        raise ValueError(f"sketch size m must be an integer, got {m!r}")
    m = int(m)
    if m <= d:
        raise ValueError(
            f"sketch size m={m} must exceed the dimension d={d}: local Hessian estimates "
            f"with m <= d rows are (near-)singular; use m of a few times d"
        )
    return m


def ridge_leverage_scores(factor: Tensor, lam: float) -> Tensor:
    r""":math:`\ell_i = a_i^\top (A^\top A + \lambda I)^{-1} a_i`; they sum to :math:`d_\lambda`."""
    a = _check_factor(factor)
    lam = check_lam(lam)
    gram = a.T @ a + lam * torch.eye(a.shape[1], dtype=DTYPE)
    chol = torch.linalg.cholesky(gram)
    b = torch.linalg.solve_triangular(chol, a.T, upper=False)  # L^{-1} A^T
    return (b**2).sum(dim=0)


def row_probabilities(factor: Tensor, distribution: str, lam: float | None = None) -> Tensor:
    """Sampling probabilities p (shape [n], sum 1): ``"uniform"`` or ``"leverage"`` (needs lam)."""
    a = _check_factor(factor)
    if distribution == "uniform":
        return torch.full((a.shape[0],), 1.0 / a.shape[0], dtype=DTYPE)
    if distribution == "leverage":
        if lam is None:
            raise ValueError("leverage-score probabilities need lam")
        scores = ridge_leverage_scores(a, lam)
        return scores / scores.sum()
    raise ValueError(f"distribution must be one of {ROW_DISTRIBUTIONS}, got {distribution!r}")


def _scaled_rows(a: Tensor, idx: Tensor, probs: Tensor, m: int) -> Tensor:
    return a[idx] / torch.sqrt(m * probs[idx])[:, None]


def _iid_indices(probs: Tensor, count: int, generator: torch.Generator) -> Tensor:
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.multinomial(probs, count, replacement=True, generator=generator)


def sample_rows(
    factor: Tensor, m: int, probabilities: Tensor, generator: torch.Generator
) -> RowSketch:
    r"""M i.i.d. rows with probabilities p, row i scaled by :math:`1/\sqrt{m p_i}`."""
    a = _check_factor(factor)
    m = check_sketch_size(m, a.shape[1])
    idx = _iid_indices(probabilities, m, generator)
    return RowSketch(_scaled_rows(a, idx, probabilities, m), idx)


def uniform_sketch(factor: Tensor, m: int, generator: torch.Generator) -> RowSketch:
    r"""M rows sampled uniformly with replacement, each scaled by :math:`\sqrt{n/m}`."""
    return sample_rows(factor, m, row_probabilities(factor, "uniform"), generator)


def leverage_sketch(factor: Tensor, m: int, lam: float, generator: torch.Generator) -> RowSketch:
    """M rows sampled i.i.d. proportionally to their ridge leverage scores."""
    return sample_rows(factor, m, row_probabilities(factor, "leverage", lam), generator)


def poisson_sketch(
    factor: Tensor, m: int, generator: torch.Generator, probabilities: Tensor | None = None
) -> RowSketch:
    r"""K ~ Poisson(m) i.i.d. rows from p (default uniform), scaled by :math:`1/\sqrt{m p_i}`.

    The per-row counts are independent Poisson(m p_i), so Ĥ is a sum of independently scaled
    rank-one terms and determinantal averaging is exactly unbiased (Dereziński & Mahoney, 2019).
    """
    a = _check_factor(factor)
    m = check_sketch_size(m, a.shape[1])
    probs = row_probabilities(a, "uniform") if probabilities is None else probabilities
    count = int(torch.poisson(torch.tensor([float(m)], dtype=DTYPE), generator=generator))
    idx = _iid_indices(probs, count, generator)
    return RowSketch(_scaled_rows(a, idx, probs, m), idx)


def gaussian_sketch(factor: Tensor, m: int, generator: torch.Generator) -> RowSketch:
    """SA with S having i.i.d. N(0, 1/m) entries (m x n)."""
    a = _check_factor(factor)
    m = check_sketch_size(m, a.shape[1])
    s = torch.randn(m, a.shape[0], dtype=DTYPE, generator=generator) / math.sqrt(m)
    return RowSketch(s @ a)


def less_sketch(
    factor: Tensor,
    m: int,
    lam: float,
    generator: torch.Generator,
    *,
    nonzeros: int | None = None,
    distribution: str = "leverage",
) -> RowSketch:
    r"""LESS embedding SA: m sparse rows, each a signed, importance-weighted sum of ``nonzeros``
    (default d, the analyzed choice) rows of A drawn i.i.d. from p (``distribution``: ridge
    leverage, or uniform for "LESS-uniform"), so that :math:`E[S^	op S] = I`.
    """
    a = _check_factor(factor)
    m = check_sketch_size(m, a.shape[1])
    s = a.shape[1] if nonzeros is None else positive_int(nonzeros, "nonzeros (per row of S)")
    probs = row_probabilities(a, distribution, lam)
    idx = _iid_indices(probs, m * s, generator).view(m, s)
    signs = torch.randint(0, 2, (m, s), generator=generator, dtype=DTYPE) * 2 - 1
    coef = signs / torch.sqrt(m * s * probs[idx])
    return RowSketch(torch.einsum("ms,msd->md", coef, a[idx]))


@dataclass(frozen=True)
class RidgeDPP:
    r"""The L-ensemble DPP over the rows of A with kernel :math:`L = AA^\top/\lambda`:
    :math:`P(T) = \det(L_T)/\det(I + L)`, expected size :math:`d_\lambda`.

    Exact spectral sampler through the dual :math:`C = A^\top A/\lambda = V\operatorname{diag}(\mu)V^\top`
    (Hough et al.; Kulesza & Taskar, Alg. 1 in dual form): keep eigenvector j with probability
    :math:`\mu_j/(1+\mu_j)`, form the orthonormal :math:`U = A V_S \operatorname{diag}(1/\sqrt{\lambda\mu_j})`,
    then pick rows one by one with probability proportional to the squared row norms of U,
    projecting the chosen row's direction out of U after each pick. Cost O(nd² + d³) once,
    O(n k²) per sample.
    """

    factor: Tensor
    lam: float
    eigenvalues: Tensor
    eigenvectors: Tensor

    @staticmethod
    def from_factor(factor: Tensor, lam: float) -> "RidgeDPP":
        r"""Eigendecompose :math:`A^\top A/\lambda` once; reuse for many samples."""
        a = _check_factor(factor)
        lam = check_lam(lam)
        mu, v = torch.linalg.eigh(a.T @ a / lam)
        return RidgeDPP(a, lam, mu.clamp_min(0.0), v)

    @property
    def expected_size(self) -> float:
        r""":math:`E|T| = \sum_j \mu_j/(1+\mu_j) = d_\lambda`."""
        return float((self.eigenvalues / (1 + self.eigenvalues)).sum())

    def sample(self, generator: torch.Generator) -> Tensor:
        """One exact draw: the sorted row indices T (a set, no repeats)."""
        mu = self.eigenvalues
        keep = torch.rand(mu.shape[0], dtype=DTYPE, generator=generator) < mu / (1 + mu)
        if not bool(keep.any()):
            return torch.zeros(0, dtype=torch.long)
        u = self.factor @ (self.eigenvectors[:, keep] / torch.sqrt(self.lam * mu[keep]))
        chosen: list[int] = []
        for _ in range(u.shape[1]):
            weights = (u**2).sum(dim=1).clamp_min(0.0)
            if chosen:
                weights[torch.tensor(chosen)] = 0.0
            i = int(torch.multinomial(weights, 1, generator=generator))
            chosen.append(i)
            row = u[i].clone()
            u = u - torch.outer(u @ row, row) / (row @ row)
        return torch.sort(torch.tensor(chosen, dtype=torch.long)).values


def surrogate_sketch(
    factor: Tensor,
    m: int,
    lam: float,
    generator: torch.Generator,
    *,
    distribution: str = "uniform",
    dpp: RidgeDPP | None = None,
) -> RowSketch:
    r"""Surrogate sketch of the Poissonized row sketch (Dereziński et al., NeurIPS'20).

    Rows: K ~ Poisson(m - d_λ) i.i.d. indices from p (``distribution``: uniform or ridge
    leverage), united with one :class:`RidgeDPP` draw T; every row scaled by :math:`1/\sqrt{m p_i}`.
    Use it with :math:`\lambda' = \lambda(1 - d_\lambda/m)` and rescale the step by
    :math:`(1 - d_\lambda/m)` (see :func:`secondorder.newton.combine.scaled_regularization`).
    Pass a precomputed ``dpp`` (for the same A and lam) to amortize its eigendecomposition.
    """
    a = _check_factor(factor)
    m = check_sketch_size(m, a.shape[1])
    lam = check_lam(lam)
    d_lam = effective_dimension(a, lam)
    probs = row_probabilities(a, distribution, lam)
    dpp = RidgeDPP.from_factor(a, lam) if dpp is None else dpp
    count = int(torch.poisson(torch.tensor([m - d_lam], dtype=DTYPE), generator=generator))
    iid = _iid_indices(probs, count, generator)
    t = dpp.sample(generator)
    idx = torch.cat([iid, t])
    return RowSketch(_scaled_rows(a, idx, probs, m), idx, t)
