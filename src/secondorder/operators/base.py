"""The one operator abstraction of secondorder.

Every curvature (Hessian, Gauss-Newton), every combination of them (sums, scalings,
damping) and later every data-parallel version implements :class:`LinearOperator`: a
symmetric ``P x P`` matrix known only through its products with blocks of vectors. The
algorithms in :mod:`secondorder.linalg` accept such an operator or a plain dense tensor
(wrapped by :func:`as_operator`), so they are tested on matrices with known spectra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from secondorder.distributed.reducer import LOCAL, Reducer


@dataclass(frozen=True)
class Block:
    """A contiguous block of coordinates ``[start, stop)``: one layer or one parameter.

    ``params`` names the parameters the block holds, in order.
    """

    name: str
    start: int
    stop: int
    params: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Number of coordinates in the block."""
        return self.stop - self.start


class LinearOperator:
    """A symmetric linear operator of shape ``(P, P)`` known through ``A @ V``.

    Subclasses implement :meth:`_matmat` on a ``[P, K]`` block and set ``shape``,
    ``dtype``, ``device`` and ``blocks``. ``A @ v`` accepts ``[P]`` or ``[P, K]``, checks
    the shape and counts ``num_matvecs`` (one per column).
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    blocks: tuple[Block, ...]
    num_matvecs: int = 0
    reducer: Reducer = LOCAL
    """How the operator's products are reduced: :data:`~secondorder.distributed.reducer.LOCAL`, or over
    the ranks for a data-parallel operator; algorithms draw ``seed=None`` probes from its shared seed."""

    @property
    def product_dtype(self) -> torch.dtype:
        """The dtype the products are computed in (``dtype`` unless promoted, see :func:`working_operator`)."""
        return self.dtype

    def _matmat(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def _as_block(self, V: Tensor) -> Tensor:
        """``V`` as a ``[P, K]`` block, or a clear error."""
        if not isinstance(V, Tensor):
            raise TypeError(f"an operator multiplies a torch.Tensor, got {type(V).__name__}")
        P = self.shape[0]
        if V.ndim not in (1, 2) or V.shape[0] != P:
            raise ValueError(
                f"operator of shape {self.shape} multiplies a vector [{P}] or a block [{P}, K]; "
                f"got a tensor of shape {list(V.shape)}"
            )
        return V if V.ndim == 2 else V.unsqueeze(1)

    def __matmul__(self, V: Tensor) -> Tensor:
        V2 = self._as_block(V).to(self.dtype)
        out = self._matmat(V2) if V2.shape[1] else V2.clone()
        self.num_matvecs += V2.shape[1]
        return out if V.ndim == 2 else out.squeeze(1)

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """Per-block quadratic forms ``sum_{i in b} V[i, k] (A V)[i, k]``: ``[num_blocks, K]``.

        What Hutchinson's trace needs. ``V`` may be compact (e.g. int8 signs); operators that
        can, reduce each product as soon as it exists instead of holding ``A V``.
        """
        V2 = self._as_block(V).to(self.dtype)
        return block_sums(V2 * (self @ V2), self.blocks)

    # ---- algebra -----------------------------------------------------------------
    def __add__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator([self, as_operator(other)])

    def __mul__(self, scale: float) -> LinearOperator:
        return ScaledOperator(self, float(scale))

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return self + (-as_operator(other))

    def block(self, name: str) -> LinearOperator:
        """The diagonal block ``A[b, b]`` of the block called ``name`` (e.g. one layer's Hessian)."""
        for b in self.blocks:
            if b.name == name:
                return SubmatrixOperator(self, b)
        raise KeyError(f"no block {name!r}; blocks are {[b.name for b in self.blocks]}")

    # ---- conversions ---------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """The dense ``[P, P]`` matrix, by ``P`` products with the identity (small P only)."""
        return self @ torch.eye(self.shape[0], dtype=self.dtype, device=self.device)

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` view (products run in torch)."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def matmat(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X), device=self.device).to(self.dtype)
            return (self @ V).detach().cpu().double().numpy()

        return ScipyOperator(
            shape=self.shape,
            dtype=np.float64,
            matvec=matmat,
            rmatvec=matmat,
            matmat=matmat,
            rmatmat=matmat,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, blocks={len(self.blocks)})"


def block_sums(X: Tensor, blocks: tuple[Block, ...]) -> Tensor:
    """Sum the rows of ``X`` ``[P, K]`` within each block: ``[num_blocks, K]``."""
    return torch.stack([X[b.start : b.stop].sum(0) for b in blocks])


def _single_block(P: int) -> tuple[Block, ...]:
    return (Block("all", 0, P),)


def _check_blocks(blocks: Sequence[Block], P: int) -> tuple[Block, ...]:
    """Blocks must tile ``[0, P)`` in order, so that per-block quantities sum to the total."""
    blocks = tuple(blocks)
    stops = [0] + [b.stop for b in blocks]
    if not blocks or any(b.start != s or b.stop <= b.start for b, s in zip(blocks, stops)) or stops[-1] != P:
        spans = [(b.start, b.stop) for b in blocks]
        raise ValueError(f"blocks must tile [0, {P}) contiguously and in order, got spans {spans}")
    return blocks


class DenseOperator(LinearOperator):
    """A dense symmetric matrix as an operator (for tests and small problems)."""

    def __init__(self, matrix: Tensor, blocks: Sequence[Block] | None = None, check_symmetric: bool = True):
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            shape = list(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"a dense operator needs a square 2-D tensor, got {shape}")
        if not matrix.is_floating_point():
            raise ValueError(f"a dense operator needs a floating-point tensor, got {matrix.dtype}")
        if check_symmetric:
            asym = (matrix - matrix.T).abs().max()
            scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
            if asym > 100 * torch.finfo(matrix.dtype).eps * scale * matrix.shape[0] ** 0.5:
                raise ValueError(
                    f"the algorithms need a symmetric matrix; this one has max|A - A^T| = {asym.item():.3g} "
                    f"(max|A| = {scale.item():.3g}). Pass (A + A.T) / 2 if the asymmetry is rounding."
                )
        self.matrix = matrix
        P = matrix.shape[0]
        self.shape = (P, P)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.blocks = _check_blocks(blocks, P) if blocks is not None else _single_block(P)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V

    def to_dense(self) -> Tensor:
        return self.matrix


class IdentityOperator(LinearOperator):
    """The ``P x P`` identity; ``A + damping * IdentityOperator(...)`` damps ``A``."""

    def __init__(self, size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.shape = (size, size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.blocks = _single_block(size)

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


class ScaledOperator(LinearOperator):
    """``scale * A``."""

    def __init__(self, op: LinearOperator, scale: float):
        self.op, self.scale = op, scale
        self.shape, self.dtype, self.device, self.blocks = op.shape, op.dtype, op.device, op.blocks
        self.reducer = op.reducer

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scale * (self.op @ V)


class CongruenceOperator(LinearOperator):
    r""":math:`D A D` for a diagonal :math:`D = \mathrm{diag}(d)`: the symmetric form of a
    diagonally preconditioned operator. With :math:`d = p^{-1/2}` its spectrum is that of
    :math:`P^{-1} A` (similar matrices), :math:`P = \mathrm{diag}(p) > 0`, which is how the
    preconditioned sharpness of an adaptive optimizer is measured with a symmetric eigensolver.
    """

    def __init__(self, op: LinearOperator, d: Tensor):
        if d.shape != (op.shape[0],):
            raise ValueError(f"the diagonal must have shape [{op.shape[0]}], got {list(d.shape)}")
        if not bool(torch.isfinite(d).all()):
            raise ValueError("the diagonal has non-finite entries")
        self.op, self.d = op, d.to(dtype=op.dtype, device=op.device).unsqueeze(1)
        self.shape, self.dtype, self.device, self.blocks = op.shape, op.dtype, op.device, op.blocks
        self.reducer = op.reducer

    def _matmat(self, V: Tensor) -> Tensor:
        return self.d * (self.op @ (self.d * V))


class SumOperator(LinearOperator):
    """``A_1 + A_2 + ...`` (shapes must agree; blocks and reducer come from the first term)."""

    def __init__(self, ops: Sequence[LinearOperator]):
        shapes = {op.shape for op in ops}
        if len(shapes) != 1:
            raise ValueError(f"cannot add operators of different shapes {sorted(shapes)}")
        self.ops = list(ops)
        first = self.ops[0]
        self.shape, self.dtype, self.device, self.blocks = first.shape, first.dtype, first.device, first.blocks
        self.reducer = first.reducer

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.ops[0] @ V
        for op in self.ops[1:]:
            out = out + (op @ V)
        return out


class SubmatrixOperator(LinearOperator):
    """A diagonal block ``A[b, b]``: products embed into ``A``'s space and restrict back.

    Each product costs one product with ``A`` (counted on both operators).
    """

    def __init__(self, op: LinearOperator, block: Block):
        self.op, self.span = op, block
        self.shape = (block.size, block.size)
        self.dtype, self.device = op.dtype, op.device
        self.blocks = (Block(block.name, 0, block.size, block.params),)
        self.reducer = op.reducer

    def _matmat(self, V: Tensor) -> Tensor:
        full = torch.zeros(V.shape[1], self.op.shape[0], dtype=V.dtype, device=V.device)
        full[:, self.span.start : self.span.stop] = V.T
        return (self.op @ full.T)[self.span.start : self.span.stop]


LOW_PRECISION = (torch.float16, torch.bfloat16)


class PromotedOperator(LinearOperator):
    """A float16/bfloat16 operator seen in float32: each product runs in the operator's own dtype
    (its input rounded to it) and comes back as float32, so everything around it (orthogonalization,
    QR, small eigendecompositions, sums over coordinates) runs in float32, which torch's CPU
    kernels support and whose rounding does not swamp the products' own.
    """

    def __init__(self, op: LinearOperator):
        self.op = op
        self.shape, self.device, self.blocks, self.reducer = op.shape, op.device, op.blocks, op.reducer
        self.dtype = torch.float32

    @property
    def product_dtype(self) -> torch.dtype:
        return self.op.product_dtype

    def _matmat(self, V: Tensor) -> Tensor:
        return (self.op @ V.to(self.op.dtype)).to(self.dtype)


def working_operator(A: LinearOperator | Tensor) -> LinearOperator:
    """``A`` as the algorithms work on it: :func:`as_operator`, promoted to float32 when its
    products are float16 or bfloat16 (:class:`PromotedOperator`).
    """
    A = as_operator(A)
    return PromotedOperator(A) if A.dtype in LOW_PRECISION else A


def as_operator(A: LinearOperator | Tensor) -> LinearOperator:
    """Return ``A`` itself if it is an operator, or a :class:`DenseOperator` for a tensor."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    raise TypeError(
        f"expected a secondorder LinearOperator or a dense symmetric torch.Tensor, got {type(A).__name__}"
    )
