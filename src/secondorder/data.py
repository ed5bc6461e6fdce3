"""Batches and the global RNG, shared by the operators and the applications: one batch or a re-iterable of
batches, moving and calling them, and seeding the (forked) generators per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn


def is_single_batch(data: Any) -> bool:
    """A single batch is a tensor, a mapping, or a *tuple* whose first item is a tensor or a mapping.

    Anything else that is iterable (a list of batches, a DataLoader) is a sequence of batches.
    """
    if isinstance(data, (Tensor, Mapping)):
        return True
    return isinstance(data, tuple) and len(data) > 0 and isinstance(data[0], (Tensor, Mapping))


def as_batches(data: Any) -> Iterable:
    """Return a re-iterable of batches; reject one-shot iterators, which would empty after one product."""
    if data is None:
        raise ValueError("data is None: pass one (inputs, targets) batch or a re-iterable of batches (list, DataLoader)")
    if is_single_batch(data):
        return [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be one (inputs, targets) batch or a re-iterable of batches, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(
            "data is a one-shot iterator (e.g. a generator); every curvature product needs a full pass, "
            "so pass a list of batches or a DataLoader instead"
        )
    return data


def tensors(obj: Any) -> Iterator[Tensor]:
    """A batch's tensors, depth-first (through mappings' values, lists and tuples)."""
    if isinstance(obj, Tensor):
        yield obj
        return
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors(item)


def first_tensor(obj: Any) -> Tensor | None:
    """The first tensor found depth-first in a batch."""
    return next(tensors(obj), None)


def shapes(obj: Any) -> tuple:
    """The shapes of a batch's tensors, depth-first (what must not change between passes)."""
    return tuple(tuple(t.shape) for t in tensors(obj))


def batch_size(batch: Any, batch_size_fn: Callable[[Any], int] | None) -> int:
    """The number of samples in a batch: ``batch_size_fn(batch)`` or the first tensor's leading size."""
    if batch_size_fn is not None:
        return int(batch_size_fn(batch))
    t = first_tensor(batch)
    if t is None or t.ndim == 0:
        raise ValueError("cannot infer the batch size of a batch without a batched tensor; pass batch_size_fn=")
    return t.shape[0]


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a nested batch to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping of inputs, ``model(inputs)`` otherwise."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


@contextmanager
def untouched(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Differentiate the model as it is without leaving a trace.

    Buffers (BatchNorm running statistics) are restored afterwards, the model's train/eval
    mode is never changed, and the global RNG state is restored so that dropout masks drawn
    inside do not advance the caller's random stream.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def seeded_batches(batches: Iterable, seed: int, device: torch.device) -> Iterator[tuple[int, Any]]:
    """Enumerate batches, seeding the (forked) RNG per batch so dropout masks are fixed per batch.

    With a fixed mask per batch, and a fixed order of a shuffling DataLoader, the operator is
    one fixed matrix across products, as Lanczos and CG require.
    """
    seed_global_rng(seed, device)  # before iter(): a shuffling DataLoader draws the same order on every product
    for index, batch in enumerate(batches):
        seed_global_rng(seed + index, device)
        yield index, batch


def seed_global_rng(value: int, device: torch.device) -> None:
    """Seed the global CPU generator and, for a CUDA ``device``, that device's default generator.

    Dropout draws from these, so seeding them (inside :func:`untouched`'s fork) fixes the masks.
    """
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(value)


def evaluate(model: nn.Module, loss_fn: Callable, data: Any, device: torch.device | None = None) -> dict:
    """Mean loss and, for class-index targets and ``[N, C]`` outputs, accuracy over ``data``.

    No gradient; the model's mode is kept (run it as it is). ``device`` defaults to the model's.
    ``accuracy`` is None when the outputs or targets are not a classification's.
    """
    if device is None:
        device = next(iter(model.parameters())).device
    total = correct = count = 0.0
    classify = True
    with torch.no_grad():
        for inputs, targets in as_batches(data):
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            out = call_model(model, inputs)
            n = len(targets)
            total += float(loss_fn(out, targets)) * n
            count += n
            if classify and out.ndim == 2 and targets.ndim == 1 and not targets.is_floating_point():
                correct += float((out.argmax(-1) == targets).sum())
            else:
                classify = False
    return {"loss": total / count, "accuracy": correct / count if classify else None}
