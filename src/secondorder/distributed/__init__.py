"""Data-parallel second-order computation on ``torch.distributed``.

* :mod:`~secondorder.distributed.process_group`: joining the group (``torchrun`` or the local
  :func:`launch`), collectives with clear errors and timeouts, the ranks' handshake (:func:`agree`,
  :class:`DisagreementError`).
* :mod:`~secondorder.distributed.buckets`: sums over ranks in few all-reduces, behind the
  data-parallel optimizer steps and curvature products.

The data-parallel curvature operators are ``HessianOperator``/``GGNOperator(..., distributed=True)``.
"""

from secondorder.distributed.buckets import sum_over_ranks
from secondorder.distributed.process_group import (
    DEFAULT_TIMEOUT,
    DisagreementError,
    DistributedError,
    World,
    agree,
    all_gather_objects,
    all_reduce,
    current_world,
    init_from_env,
    launch,
    shutdown,
)

__all__ = [
    "DEFAULT_TIMEOUT", "DisagreementError", "DistributedError", "World", "agree", "all_gather_objects", "all_reduce", "current_world",
    "init_from_env", "launch", "shutdown", "sum_over_ranks",
]
