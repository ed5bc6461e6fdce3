"""Random probes from an explicit generator (the global RNG is never touched)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor

from secondorder import validation
from secondorder.linalg.progress import ticking
from secondorder.operators.base import LinearOperator, working_operator

Seed = int | torch.Generator | None


def make_generator(seed: Seed, A: LinearOperator) -> torch.Generator:
    """A generator on ``A``'s device from an int seed, an existing generator, or for ``None``
    ``A.reducer.shared_seed()`` (OS entropy; the same on every rank for a data-parallel operator).
    """
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device=A.device)
    if seed is None:
        gen.manual_seed(A.reducer.shared_seed(A.device))
    elif isinstance(seed, int) and not isinstance(seed, bool):
        gen.manual_seed(validation.seed(seed))
    else:
        raise TypeError(f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}")
    return gen


def rademacher_signs(num: int, size: int, gen: torch.Generator, device: torch.device | str | None = None) -> Tensor:
    """A ``[num, size]`` int8 block of independent +-1 entries drawn from ``gen`` only (on ``device``,
    default the generator's).
    """
    signs = torch.randint(0, 2, (num, size), generator=gen, device=gen.device, dtype=torch.int8)
    return signs.to(gen.device if device is None else device).mul_(2).sub_(1)


def rademacher(A: LinearOperator, num: int, gen: torch.Generator, compact: bool = False) -> Tensor:
    """A ``[P, num]`` block of independent +-1 entries on the operator's device.

    In the operator's dtype, or as int8 with ``compact=True`` (a quarter of float32's memory).
    Column-major: each probe is a contiguous row of the transpose.
    """
    signs = rademacher_signs(num, A.shape[0], gen, A.device)
    return (signs if compact else signs.to(A.dtype)).T


def chunk_sizes(total: int, probe_chunk: int | None) -> list[int]:
    """Split ``total`` probes into chunks of ``probe_chunk`` (all at once for ``None``)."""
    step = probe_chunk or total
    return [min(step, total - start) for start in range(0, total, step)]


def with_probe_chunk(methods: dict[str, tuple[Callable, int]], name: str,
                     probe_chunk: int | None) -> dict[str, tuple[Callable, int]]:
    """``methods`` with ``methods[name]`` drawing its probes ``probe_chunk`` at a time."""
    validation.optional_positive_int(probe_chunk, "probe_chunk (probes drawn and multiplied at once)")
    estimator, minimum = methods[name]
    return {**methods, name: (partial(estimator, probe_chunk=probe_chunk), minimum)}


def check_budget(num_matvecs: int, minimum: int, method: str) -> None:
    """Reject a matvec budget below what the method needs."""
    if not isinstance(num_matvecs, int) or num_matvecs < minimum:
        raise ValueError(f"{method} needs num_matvecs >= {minimum} (an integer), got {num_matvecs!r}")


def run_estimator(
    A: LinearOperator | Tensor,
    num_matvecs: int,
    method: str,
    methods: dict[str, tuple[Callable, int]],
    seed: Seed,
    what: str,
    progress: bool = False,
) -> tuple[LinearOperator, Any, int]:
    """Validate and run ``methods[method] = (estimator, minimum budget)`` on ``A``.

    Returns the operator, the estimator's output and the number of products it spent.
    """
    A = working_operator(A)
    if method not in methods:
        raise ValueError(f"unknown {what} method {method!r}; choose one of {sorted(methods)}")
    estimator, minimum = methods[method]
    check_budget(num_matvecs, minimum, method)
    gen = make_generator(seed, A)
    with ticking(A, progress, num_matvecs, f"{what} ({method})") as op, torch.no_grad():
        start = op.num_matvecs
        out = estimator(op, num_matvecs, gen)
        used = op.num_matvecs - start
    return A, out, used
