"""Where per-batch curvature products go: summed into a block, or reduced to quadratic forms.

A sink receives, chunk by chunk, the probes' per-parameter pieces and their products (see
:mod:`secondorder.operators.products`) and folds ``weight`` times them into an accumulator.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from secondorder.operators.products import Sink


def product_sink(out: Tensor, params: Sequence[Tensor], weight: float) -> Sink:
    """``out[k] += weight * (C v_k)`` for ``out`` ``[K, P]`` (the inverse of ``split_rows``)."""

    def sink(start: int, pieces: list[Tensor], products: tuple) -> None:
        rows = out[start : start + pieces[0].shape[0]]
        offset = 0
        for product, p in zip(products, params):
            n = p.numel()
            if product is not None:  # None: no dependence on that parameter, nothing to add
                rows[:, offset : offset + n].add_(product.reshape(rows.shape[0], n), alpha=weight)
            offset += n

    return sink


def quadratic_form_sink(out: Tensor, block_of_param: list[int], weight: float) -> Sink:
    """``out[b, k] += weight * sum_{i in block b} v_k[i] (C v_k)[i]`` for ``out`` ``[num_blocks, K]``.

    Each product is reduced as soon as it exists, so memory holds one chunk's products at most.
    """

    def sink(start: int, pieces: list[Tensor], products: tuple) -> None:
        k = pieces[0].shape[0]
        for piece, product, b in zip(pieces, products, block_of_param):
            if product is not None:
                out[b, start : start + k] += weight * (piece * product).reshape(k, -1).sum(1)

    return sink
