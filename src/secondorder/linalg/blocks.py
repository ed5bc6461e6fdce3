"""Per-block (per-layer) spectra: the extreme eigenvalues of every diagonal block in one call.

The diagonal block :math:`H_{bb}` of a layer is the curvature of the loss in that layer's
parameters with the others fixed; its top eigenvalue is the layer sensitivity of HAWQ
(Dong et al. 2019). Blocks small enough are solved densely.
"""

from __future__ import annotations

import torch

from secondorder.linalg.eigen import _order, eigenvalues
from secondorder.linalg.probes import Seed
from secondorder.linalg.results import EigenResult
from secondorder.operators.base import LinearOperator, as_operator


def _dense_block(op: LinearOperator, k: int, which: str) -> EigenResult:
    """All eigenpairs of a small block from its dense matrix (``size`` products)."""
    start = op.num_matvecs
    M = op.to_dense().double()
    theta, S = torch.linalg.eigh((M + M.T) / 2)
    idx = _order(theta, which)[:k]
    vectors = S[:, idx]
    residuals = (M @ vectors - vectors * theta[idx]).norm(dim=0)
    return EigenResult(
        eigenvalues=theta[idx].to(op.dtype), eigenvectors=vectors.to(op.dtype), residuals=residuals.to(op.dtype),
        converged=torch.ones(len(idx), dtype=torch.bool), num_matvecs=op.num_matvecs - start, num_restarts=0,
        which=which, method="dense",
    )


def block_eigenvalues(
    A: LinearOperator | torch.Tensor, k: int = 1, which: str = "largest", seed: Seed = None, **kwargs
) -> dict[str, EigenResult]:
    """The ``k`` extreme eigenpairs of every diagonal block of ``A``, keyed by block name.

    Blocks with at most ``max(2 k + 10, 20)`` coordinates are solved densely (at most ``k`` of
    their eigenpairs are returned); larger ones by :func:`~secondorder.eigenvalues` with
    ``kwargs`` (``tol``, ``method``, ``max_matvecs``, ``ncv``).
    """
    A = as_operator(A)
    out = {}
    for b in A.blocks:
        op = A.block(b.name)
        small = b.size <= max(2 * k + 10, 20)
        out[b.name] = _dense_block(op, k, which) if small else eigenvalues(op, k, which, seed=seed, **kwargs)
    return out
