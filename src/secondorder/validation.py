"""Argument checks shared by every module: each raises ``ValueError`` naming the argument, what it
must be and what it was, and returns the checked value (so a check reads as an assignment).

>>> positive_int(3, "num_probes")
3
>>> positive_int(0, "num_probes")
Traceback (most recent call last):
    ...
ValueError: num_probes must be a positive integer, got 0
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any, Collection, TypeVar

from torch import Tensor

__all__ = [
    "bit_width", "non_negative", "non_negative_int", "one_of", "optional_positive_int", "positive",
    "positive_finite", "positive_int", "scalar_loss", "seed", "tolerance",
]

T = TypeVar("T")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` >= 1 (``bool`` is refused)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


MAX_SEED = 2**62


def seed(value: Any, name: str = "seed") -> int:
    """An integer seed in ``0 .. 2**62`` (``torch.Generator.manual_seed`` takes up to ``2**64 - 1``;
    the margin leaves room for per-batch and per-rank offsets such as ``seed + index``).

    >>> seed(2**70)
    Traceback (most recent call last):
        ...
    ValueError: seed must be an integer in 0..2**62, got 1180591620717411303424
    """
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in 0..2**62, got {value!r}")
    return int(value)


def optional_positive_int(value: Any, name: str) -> int | None:
    """``None`` or a positive integer."""
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return None if value is None else int(value)


def non_negative_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def positive(value: Any, name: str) -> float:
    """A real number > 0 (NaN refused); ``math.inf`` is allowed."""
    if not isinstance(value, Real) or isinstance(value, bool) or not float(value) > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return float(value)


def positive_finite(value: Any, name: str) -> float:
    """A finite real number > 0."""
    if not isinstance(value, Real) or isinstance(value, bool) or not 0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def tolerance(value: Any, name: str = "tol") -> float:
    """A relative tolerance: finite, positive and below 1 (every algorithm's one check).

    ``inf`` (or anything >= 1) would certify any iterate at once and ``nan`` none ever.

    >>> tolerance(float("inf"))
    Traceback (most recent call last):
        ...
    ValueError: tol must be a relative tolerance, a finite number with 0 < tol < 1; got inf
    """
    if not isinstance(value, Real) or isinstance(value, bool) or not 0 < float(value) < 1:
        raise ValueError(f"{name} must be a relative tolerance, a finite number with 0 < {name} < 1; got {value!r}")
    return float(value)


def non_negative(value: Any, name: str) -> float:
    """A real number >= 0 (NaN refused)."""
    if not isinstance(value, Real) or isinstance(value, bool) or not float(value) >= 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return float(value)


def fraction(value: Any, name: str) -> float:
    """A real number in ``[0, 1)`` (a momentum, a decay; NaN refused)."""
    if not isinstance(value, Real) or isinstance(value, bool) or not 0 <= float(value) < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def one_of(value: T, name: str, options: Collection[T]) -> T:
    """``value`` if it is one of ``options``."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def bit_width(value: Any, name: str, low: int = 1, high: int = 32) -> int:
    """An integer bit width in ``low..high``.

    >>> bit_width(4.0, "pinned['fc']")
    Traceback (most recent call last):
        ...
    ValueError: pinned['fc']: bit width 4.0 is not an integer in 1..32
    """
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{name}: bit width {value!r} is not an integer in {low}..{high}")
    return int(value)


def scalar_loss(loss: Any, where: str, advice: str = "return the mean loss (reduction='mean')") -> Tensor:
    """``loss`` if it is a 0-d tensor, else an error saying ``where`` it came from and what it was.

    >>> import torch
    >>> scalar_loss(torch.ones(3), "batch 0")
    Traceback (most recent call last):
        ...
    ValueError: the loss of batch 0 must be a scalar tensor, got shape [3]; return the mean loss (reduction='mean')
    """
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        got = f"shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the loss of {where} must be a scalar tensor, got {got}; {advice}")
    return loss

