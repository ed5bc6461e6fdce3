r"""Per-block (per-layer) spectra: the extreme eigenvalues of every diagonal block in one call.

The diagonal block :math:`H_{bb}` of a layer is the curvature of the loss in that layer's
parameters with the others fixed; its top eigenvalue is the layer sensitivity of HAWQ
(Dong et al. 2019).

All blocks are solved in lockstep (:func:`~secondorder.linalg.eigen.lockstep`): each round
stacks every unfinished block's next Lanczos vector, zero outside its block, into one
``[P, L]`` block :math:`V` and multiplies once. Column ``b`` of :math:`AV` restricted to block
``b``'s rows is :math:`A_{bb} v_b`, so each block's Lanczos sees exactly the products it would see
alone, and the whole spectrum costs the data passes of the slowest block instead of their sum.
Blocks small enough are solved densely from their identity columns, stacked into the first round.
"""

from __future__ import annotations

import torch

from secondorder.linalg.eigen import Problem, checked_tol, lockstep
from secondorder.linalg.probes import Seed, make_generator
from secondorder.linalg.progress import ticking
from secondorder.linalg.results import EigenResult
from secondorder.operators.base import LinearOperator, working_operator


def block_eigenvalues(
    A: LinearOperator | torch.Tensor,
    k: int = 1,
    which: str = "largest",
    seed: Seed = None,
    tol: float | None = None,
    method: str = "lanczos",
    max_matvecs: int | None = None,
    ncv: int | None = None,
    block_size: int | None = None,
    progress: bool = False,
) -> dict[str, EigenResult]:
    """The ``k`` extreme eigenpairs of every diagonal block of ``A``, keyed by block name.

    Blocks with at most ``max(2 k + 10, 20)`` coordinates are solved densely (at most ``k`` of
    their eigenpairs are returned); larger ones as by :func:`~secondorder.eigenvalues` with
    ``tol``, ``method``, ``max_matvecs``, ``ncv`` and ``block_size`` (budgets per block), each from
    its own generator of ``seed``, all in lockstep: one product of ``A`` per round.
    """
    A = working_operator(A)
    checked_tol(tol, A.product_dtype)  # also where every block is small enough to be solved densely
    problems = [
        Problem.small(b.size, k, which, A.product_dtype) if b.size <= max(2 * k + 10, 20)
        else Problem.checked(b.size, k, which, tol, method, max_matvecs, ncv, block_size, A.product_dtype)
        for b in A.blocks
    ]
    total = sum(p.max_matvecs for p in problems)
    with ticking(A, progress, total, f"block eigenvalues ({method})") as op, torch.no_grad():
        solvers = [(slice(b.start, b.stop), p.solver(make_generator(seed, A), A.dtype, A.device))
                   for b, p in zip(A.blocks, problems)]
        runs = lockstep(op, solvers)
    return {b.name: p.result(run, A.dtype) for b, p, run in zip(A.blocks, problems, runs)}
