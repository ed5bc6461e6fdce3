"""Data-parallel second-order computation on ``torch.distributed``.

* :mod:`~secondorder.distributed.process_group`: joining the group (``torchrun`` or the local
  :func:`launch`), collectives with clear errors and timeouts.
"""

from secondorder.distributed.process_group import (
    DEFAULT_TIMEOUT,
    DistributedError,
    World,
    all_gather_objects,
    all_reduce,
    current_world,
    init_from_env,
    launch,
    shutdown,
)

__all__ = [
    "DEFAULT_TIMEOUT", "DistributedError", "World", "all_gather_objects", "all_reduce", "current_world",
    "init_from_env", "launch", "shutdown",
]
