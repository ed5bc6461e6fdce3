"""What "nothing is lost" means, as a check: a :class:`Snapshot` of everything a refused call
could change, compared bitwise afterwards.

It holds the model's parameters, buffers, ``requires_grad`` flags, ``.grad`` and modes, the
optimizer's ``state_dict`` (its state, hyperparameters, counters and probe generator), any
extra generators, and the global RNGs (torch, Python's ``random``, NumPy).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def _frozen(value: Any) -> Any:
    """A deep copy that later changes to ``value`` cannot reach."""
    return copy.deepcopy(value)


def same(a: Any, b: Any) -> bool:
    """Bitwise equality through dicts, lists and tuples (tensors by dtype, shape and bits; NaN == NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return bool(a == b) or (a != a and b != b)


def _bits(t: Tensor) -> Tensor:
    """The tensor's bytes (so that NaN equals NaN and -0.0 differs from 0.0)."""
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)


def _model_state(model: nn.Module) -> dict:
    return {
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def _global_rngs() -> dict:
    return {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()[1].copy()}


@dataclass
class Snapshot:
    """Everything a refused call must leave as it was; :meth:`assert_unchanged` names what changed."""

    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    generators: Sequence[torch.Generator] = ()
    taken: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.taken = self._take()

    def _take(self) -> dict:
        out: dict[str, Any] = {"global RNGs": _global_rngs(),
                               "generators": [g.get_state() for g in self.generators]}
        if self.model is not None:
            out.update(_model_state(self.model))
        if self.optimizer is not None:
            out["optimizer state_dict"] = _frozen(self.optimizer.state_dict())
            out["optimizer attributes"] = {k: v for k, v in vars(self.optimizer).items()
                                           if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
        return out

    def changed(self) -> list[str]:
        """The names of what differs from when the snapshot was taken."""
        now = self._take()
        return [key for key in self.taken if not same(self.taken[key], now[key])]

    def assert_unchanged(self) -> None:
        changed = self.changed()
        assert not changed, f"the refused call changed: {', '.join(changed)}"
