r"""Sums over ranks in few all-reduces: the data-parallel optimizer step (:mod:`secondorder.optim`)
and the data-parallel curvature products.

With :math:`W` ranks, each passing the same number :math:`n` of closures on equal-size shards,
the step averages over all :math:`nW` micro-batches:

.. math::

    g = \frac{1}{nW}\sum_{r=1}^{W}\sum_{i=1}^{n} \nabla \ell_{r,i}, \qquad
    z \odot Hz = \frac{1}{nW}\sum_{r,i} z \odot H_{r,i} z,

which, because every rank draws the same probe :math:`z` from the optimizer's own generator,
are exactly the gradient and the Hutchinson product of the mean loss on the concatenated data.
The sums travel in a few flat buffers (:func:`sum_over_ranks`), one all-reduce per bucket.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.distributed.process_group import all_reduce, current_world
from secondorder.validation import positive

__all__ = ["BUCKET_BYTES", "gather_counts", "sum_over_ranks"]

BUCKET_BYTES = 25 * 2**20
"""Size cap of one all-reduce buffer (DDP's default ``bucket_cap_mb=25``)."""


def sum_over_ranks(tensors: list[Tensor], *, what: str, bucket_bytes: float = BUCKET_BYTES) -> list[Tensor]:
    """Every tensor summed over the ranks, with one all-reduce per bucket instead of one per tensor.

    Tensors are grouped by (device, dtype) in order of first appearance and copied, flattened,
    into buffers of at most ``bucket_bytes`` (a larger tensor gets a buffer of its own;
    ``math.inf``: one buffer per device and dtype). The
    results are views of the reduced buffers, shaped like the inputs, which are left unchanged.
    Every rank must pass the same shapes and dtypes in the same order. In a world of one the
    buffers are reduced by the identity.
    """
    positive(bucket_bytes, "bucket_bytes")
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[Tensor | None] = [None] * len(tensors)
    for indices in groups.values():
        for bucket in _buckets(indices, tensors, bucket_bytes):
            flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
            all_reduce(flat, what=what)
            for i, piece in zip(bucket, flat.split([tensors[i].numel() for i in bucket])):
                out[i] = piece.view_as(tensors[i])
    return out  # type: ignore[return-value]


def _buckets(indices: list[int], tensors: list[Tensor], cap: float) -> list[list[int]]:
    buckets: list[list[int]] = [[]]
    size = 0
    for i in indices:
        nbytes = tensors[i].numel() * tensors[i].element_size()
        if buckets[-1] and size + nbytes > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


def gather_counts(*counts: int, device: torch.device, what: str) -> list[list[int]]:
    """Every rank's ``counts`` (non-negative integers), as ``[[rank 0's], [rank 1's], ...]``.

    One all-reduce of ``len(counts) * world_size`` integers: each rank fills its own slots.
    """
    world = current_world()
    slots = torch.zeros(world.size, len(counts), dtype=torch.int64, device=device)
    slots[world.rank] = torch.tensor(counts, dtype=torch.int64)
    return all_reduce(slots, what=what).tolist()
