"""Progress bars for long products: an operator wrapper that ticks once per matrix-vector product."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from torch import Tensor
from tqdm import tqdm

from secondorder.operators.base import LinearOperator


class _Ticking(LinearOperator):
    """Forwards every product to ``op`` and advances ``bar`` by its number of columns."""

    def __init__(self, op: LinearOperator, bar: tqdm):
        self.op, self.bar = op, bar
        self.shape, self.dtype, self.device, self.blocks = op.shape, op.dtype, op.device, op.blocks
        self.reducer = op.reducer
        self.num_matvecs = 0

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.op @ V
        self.bar.update(V.shape[1])
        return out

    def quadratic_forms(self, V: Tensor) -> Tensor:
        out = self.op.quadratic_forms(V)
        k = V.shape[1] if V.ndim == 2 else 1
        self.num_matvecs += k
        self.bar.update(k)
        return out


@contextmanager
def ticking(op: LinearOperator, enabled: bool, total: int, desc: str) -> Iterator[LinearOperator]:
    """``op`` itself, or with ``enabled`` a wrapper that shows a bar of ``total`` products on stderr."""
    if not enabled:
        yield op
        return
    bar = tqdm(total=total, desc=desc, unit="matvec", file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield _Ticking(op, bar)
    finally:
        bar.close()
