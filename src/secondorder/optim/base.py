"""What the second-order optimizers share: the closure contract and hyperparameter checks."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Closure = Callable[[], Tensor]
"""Returns the mean loss of the current batch; it must not call ``backward``."""


def validate_common(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Reject hyperparameters every Adam-like optimizer shares, with what to do instead."""
    if not lr >= 0.0:
        raise ValueError(f"lr must be non-negative, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")


def checked_loss(loss: object, step: int) -> Tensor:
    """The closure's loss, or a clear error if it is not a finite scalar tensor with a graph."""
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the closure must return the scalar mean loss; at step {step} it returned {shape}")
    if not loss.requires_grad:
        raise ValueError(
            f"the loss at step {step} does not depend on the parameters (no graph): compute it inside the "
            "closure, outside torch.no_grad(), and do not call backward"
        )
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss at step {step} is {loss.item()}; parameters were not changed")
    return loss
