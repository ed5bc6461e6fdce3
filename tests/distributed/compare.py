"""What the data-parallel tests share: the single-process reference on one thread, and the
differences between two nested runs (tensors, floats, counters, generator states)."""

from __future__ import annotations

import contextlib
import re

import torch


@contextlib.contextmanager
def one_thread():
    """The reference runs as the workers do (one thread; two threads on a busy 2-core machine are 5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def leaves(value, path: str = ""):
    """``(path, value)`` of every tensor and scalar in a nested run or state."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}/{i}")
    else:
        yield path, value


def differences(got: dict, want: dict, tol: float) -> list[str]:
    """Where two runs differ: floating tensors and floats by more than ``tol`` times their largest
    magnitude (at least 1), everything else (generator states, counters, names) at all."""
    mine, theirs = dict(leaves(got)), dict(leaves(want))
    assert mine.keys() == theirs.keys()
    out = []
    for path, b in theirs.items():
        a = mine[path]
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            scale = max(1.0, float(b.abs().max()))
            if a.shape != b.shape or not float((a - b).abs().max()) <= tol * scale:
                out.append(f"{path} differs by {float((a - b).abs().max()):.1e} (largest {scale:.1e})")
        elif isinstance(b, torch.Tensor):
            if not torch.equal(a, b):
                out.append(f"{path} differs")
        elif isinstance(b, float):
            if not abs(a - b) <= tol * max(1.0, abs(b)):
                out.append(f"{path}: {a!r}, expected {b!r}")
        elif a != b:
            out.append(f"{path}: {a!r}, expected {b!r}")
    return out


def assert_refusals(bad: dict, expected: list[str]) -> None:
    """A rank's ``bad`` record of a disagreement worker: one message per case matching each pattern
    of ``expected`` in turn (the last case agrees: ``no error``), and every refused step left
    everything untouched."""
    messages, untouched = bad["messages"], bad["untouched"]
    assert len(messages) == len(expected)
    for message, pattern in zip(messages, expected):
        assert re.search(pattern, message), (pattern, message)
    assert untouched == [True] * (len(expected) - 1) + [False]  # a refused step changes nothing
