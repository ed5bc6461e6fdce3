"""Naming the user's batch that the model or the loss rejected, wherever in a data pass that happens.

The operators make many passes over ``--data``; only the first batch is checked up front (one
forward, :func:`~secondorder.cli.common.check_forward`). :class:`WatchedBatches` wraps the
batches and remembers which one a pass took last; :func:`naming_the_batch` turns an error that the
user's model or loss raised on a later batch into a :class:`UsageError` naming that batch and its
shapes beside the first batch's. An error raised elsewhere (the library's own code), or on the first
batch (which passed the check, so the fault is not its data), keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Callable

from torch import Tensor, nn

from secondorder.cli.errors import UsageError

REJECTIONS = (RuntimeError, ValueError, TypeError, IndexError)
"""What torch raises for a batch that does not fit the model or the loss."""


class WatchedBatches:
    """A re-iterable of the user's batches that records the batch each pass took last.

    Iterating it iterates ``batches`` (in its order, at the same moment, so a seeded shuffling
    DataLoader draws the same order); ``numbers`` are the batches' indices in ``--data`` (a
    process's shard holds every W-th batch), by default 0, 1, ...; ``first`` is batch 0 of
    ``--data``, whose shapes the error shows beside the rejected batch's.
    """

    def __init__(self, batches: Iterable, first: Any, numbers: Sequence[int] | None = None) -> None:
        self.batches: Any = batches
        self.first = first
        self.numbers = numbers
        self.current: tuple[int, Any] | None = None

    def __iter__(self) -> Iterator:
        return self._track(iter(self.batches))

    def _track(self, items: Iterator) -> Iterator:
        for position, batch in enumerate(items):
            number = position if self.numbers is None else self.numbers[position]
            self.current = (number, batch)
            yield batch
        self.current = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Any:
        return self.batches[index]


def describe(value: Any) -> str:
    """The shapes of a batch's part: ``[15, 7]`` for a tensor, nested for tuples, lists and mappings."""
    if isinstance(value, Tensor):
        return str(list(value.shape))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


def _shapes(batch: Any) -> str:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return f"inputs {describe(batch[0])}, targets {describe(batch[1])}"
    return describe(batch)


def raised_by(err: BaseException, model: nn.Module, loss_fn: Callable) -> bool:
    """Whether ``err`` was raised inside the model (or a copy of it, same class) or the loss function."""
    codes = {getattr(loss_fn, "__code__", None), getattr(getattr(loss_fn, "func", None), "__code__", None)} - {None}
    tb: TracebackType | None = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if type(owner) is type(model) or owner is loss_fn or frame.f_code in codes:
            return True
        tb = tb.tb_next
    return False


@contextmanager
def naming_the_batch(model: nn.Module, loss_fn: Callable, data: Any) -> Iterator[None]:
    """Report an error that ``model`` or ``loss_fn`` raised on batch 1, 2, ... of ``data`` (a
    :class:`WatchedBatches`; anything else: no change) as a one-line :class:`UsageError` naming the batch.
    """
    try:
        yield
    except REJECTIONS as err:
        if isinstance(err, UsageError) or not isinstance(data, WatchedBatches) or data.current is None:
            raise
        number, batch = data.current
        if number == 0 or not raised_by(err, model, loss_fn):
            raise
        lines = str(err).strip().splitlines()
        raise UsageError(f"the model rejected batch {number} of --data ({_shapes(batch)}; batch 0 has "
                         f"{_shapes(data.first)}): "
                         f"{type(err).__name__}: {lines[0] if lines else ''}") from err
