r"""The one data-parallel mechanism: a reducer that operators and optimizers are handed.

Every data-parallel computation here is a sum of per-rank local sums, a check that the ranks
agree, or a seed they share. A :class:`Reducer` does exactly those things; :data:`LOCAL` does
them for a world of one (sums unchanged, agreement trivial, a fresh seed from OS entropy), and
:class:`RankReducer` over the initialized ``torch.distributed`` group. Code that computes a local
sum and hands it to ``reducer.sum`` is data-parallel with no rank code of its own: the maths
stays where it is, only the mechanics live here.

With :math:`W` ranks holding shards of sizes :math:`n_r`, a data-set mean becomes
:math:`\frac{\sum_r n_r \bar x_r}{\sum_r n_r}`: each rank passes :math:`n_r \bar x_r` and
:math:`n_r` to one :meth:`Reducer.sum` and divides after it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence, TypeVar

import torch
from torch import Tensor

from secondorder.distributed.buckets import BUCKET_BYTES, gather_counts, sum_over_ranks
from secondorder.distributed.process_group import World, agree, all_reduce, current_world

__all__ = ["LOCAL", "RankReducer", "Reducer", "check_option", "digest", "reducer_for"]

T = TypeVar("T")


def digest(state: Tensor) -> str:
    """A short hash of a tensor's bytes (e.g. a generator state), for handshakes."""
    return hashlib.sha256(state.cpu().numpy().tobytes()).hexdigest()[:16]


class Reducer:
    """A world of one: every reduction is the identity. The base of :class:`RankReducer`."""

    @property
    def world(self) -> World:
        return World(0, 1, "none", 0.0)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    @property
    def distributed(self) -> bool:
        """Whether reductions communicate."""
        return False

    def sum(self, tensors: list[Tensor], *, what: str, bucket_bytes: float = BUCKET_BYTES) -> list[Tensor]:
        """Every tensor summed over the ranks, in buckets of at most ``bucket_bytes`` (``math.inf``:
        one buffer per device and dtype). ``what`` names the collective in errors.
        """
        return list(tensors)

    def sum_with_totals(self, values: Tensor, *totals: float, what: str,
                        same: Tensor | None = None) -> tuple[Tensor, list[float]]:
        r"""``values`` and the scalars ``totals`` summed over the ranks in one buffer.

        With ``same`` (e.g. the probes a product multiplied), also check that every rank passed
        the same tensor: its checksums :math:`c_r` travel in the buffer, and their spread
        :math:`\overline{c^2} - ar c^2` is zero iff (almost surely) all ranks agree; otherwise
        ``ValueError`` on every rank.
        """
        if not self.distributed:
            return values, [float(t) for t in totals]
        check = [] if same is None else [float(same.sum(dtype=torch.float64))] * 2
        if check:
            check[1] *= check[1]
        tail = torch.tensor([*totals, *check], dtype=values.dtype, device=values.device)
        values, tail = self.sum([values, tail], what=what, bucket_bytes=math.inf)
        out = tail.tolist()
        if check:
            mean, squares = out[-2] / self.size, out[-1] / self.size
            if squares - mean * mean > 1e-5 * max(squares, 1.0):
                raise ValueError(
                    f"the ranks multiplied different vectors in '{what}': every rank must call the same algorithms "
                    "with the same arguments and seeds (an int seed, or seed=None, which the ranks agree on; "
                    "not per-rank generators)"
                )
        return values, out[: len(totals)]

    def maximum(self, tensor: Tensor, *, what: str) -> Tensor:
        """The element-wise maximum of ``tensor`` over the ranks (a new tensor)."""
        return tensor.clone()

    def counts(self, *counts: int, device: torch.device, what: str) -> list[list[int]]:
        """Every rank's non-negative integer ``counts``, in rank order."""
        return [list(counts)]

    def agree(self, facts: dict[str, Any], *, what: str, advice: str) -> None:
        """Raise ``ValueError`` on every rank naming the first fact the ranks disagree on."""

    def shared_seed(self, device: torch.device | str = "cpu") -> int:
        """A fresh random seed (OS entropy), the same on every rank."""
        return int(torch.Generator().seed())

    def shard(self, items: Sequence[T], *, what: str) -> list[T]:
        """This rank's items ``r, r + W, r + 2W, ...`` (every rank passes the same items)."""
        if len(items) < self.size:
            raise ValueError(f"{what} has {len(items)} item(s) for {self.size} processes; give at least one "
                             "per process")
        return list(items)[self.rank :: self.size]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


LOCAL = Reducer()
"""The reducer of a single process."""


class RankReducer(Reducer):
    """Reductions over the initialized ``torch.distributed`` group (gloo or nccl), each under the
    group's timeout: a dead or hung rank makes the others raise
    :class:`~secondorder.distributed.DistributedError` naming the collective.
    """

    def __init__(self) -> None:
        if not current_world().distributed:
            raise ValueError(
                "distributed=True but torch.distributed is not initialized: call secondorder.distributed.init_from_env() "
                "first (under torchrun), or pass distributed='auto'"
            )

    @property
    def world(self) -> World:
        return current_world()

    @property
    def distributed(self) -> bool:
        return True

    def sum(self, tensors: list[Tensor], *, what: str, bucket_bytes: float = BUCKET_BYTES) -> list[Tensor]:
        return sum_over_ranks(tensors, what=what, bucket_bytes=bucket_bytes)

    def maximum(self, tensor: Tensor, *, what: str) -> Tensor:
        return all_reduce(tensor.clone(), "max", what=what)

    def counts(self, *counts: int, device: torch.device, what: str) -> list[list[int]]:
        return gather_counts(*counts, device=device, what=what)

    def agree(self, facts: dict[str, Any], *, what: str, advice: str) -> None:
        agree(facts, what=what, advice=advice)

    def shared_seed(self, device: torch.device | str = "cpu") -> int:
        """Rank 0's fresh seed on every rank (one all-reduce of one integer)."""
        seed = super().shared_seed() & ((1 << 62) - 1)
        shared = torch.tensor([seed if self.rank == 0 else 0], dtype=torch.int64, device=device)
        return int(all_reduce(shared, what="shared seed"))


def check_option(distributed: Any) -> bool | str | Reducer:
    """A valid ``distributed=`` option, or ``ValueError``."""
    if not (isinstance(distributed, Reducer) or distributed is True or distributed is False or distributed == "auto"):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r} (or a Reducer)")
    return distributed


def reducer_for(distributed: bool | str | Reducer) -> Reducer:
    """The reducer a ``distributed=`` option asks for: ``"auto"`` reduces over the ranks whenever
    torch.distributed runs more than one process, ``True`` requires an initialized group,
    ``False`` never communicates, and a :class:`Reducer` is used as it is.
    """
    if isinstance(check_option(distributed), Reducer):
        return distributed  # type: ignore[return-value]
    world = current_world()
    if distributed is True:
        return RankReducer()
    return RankReducer() if distributed == "auto" and world.size > 1 else LOCAL
