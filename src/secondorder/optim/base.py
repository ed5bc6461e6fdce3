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


def check_finite(step: int, **named: list | tuple) -> None:
    """Raise before any parameter changes if a gradient or curvature estimate is not finite."""
    for name, tensors in named.items():
        if any(t is not None and not torch.isfinite(t).all() for t in tensors):
            raise FloatingPointError(f"the {name} at step {step} is not finite; parameters were not changed")


def gradient_only(loss: Tensor, params: list[Tensor]) -> tuple[Tensor, tuple, list]:
    """``(loss, gradient, no curvature)`` for the steps between curvature refreshes: a plain backward."""
    return loss, torch.autograd.grad(loss, params, allow_unused=True), [None] * len(params)


class SecondOrderOptimizer(torch.optim.Optimizer):
    """The step every curvature-preconditioned optimizer here shares.

    ``step(closure)`` evaluates the closure once, asks :meth:`_derivatives` for the loss, the
    gradient and, on curvature steps (1, every+1, 2 every+1, ...), a per-parameter curvature
    estimate; checks them all before touching any parameter; then calls :meth:`_update` per
    parameter. Probes come from the optimizer's own ``generator`` (seeded by ``seed``), which
    ``state_dict`` saves with the step counters, so a resumed run is bitwise identical.
    """

    def __init__(self, params, defaults: dict, every: int, seed: int):
        super().__init__(params, defaults)
        self.every, self.seed = every, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.num_steps = 0
        self.num_curvature_steps = 0

    def _derivatives(self, out: object, params: list[Tensor], step: int, refresh: bool) -> tuple[Tensor, tuple, list]:
        raise NotImplementedError

    def _update(self, p: Tensor, group: dict, grad: Tensor, estimate: Tensor | None) -> int:
        raise NotImplementedError

    def _momentum(self, p: Tensor, grad: Tensor, beta1: float, curvature_key: str) -> dict:
        """The parameter's state (created at first use: momentum and a curvature buffer), momentum updated."""
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state[curvature_key] = torch.zeros_like(p)
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        return state

    def _finish(self, counted: int, total: int) -> None:
        """Hook after a step with the summed return values of :meth:`_update` and the coordinate count."""

    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One step: ``closure()`` computes the loss (no ``backward``, no ``zero_grad``); returns the loss."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__} computes its own gradient and Hessian-vector products: call "
                "step(closure) with closure() returning the loss, without calling backward"
            )
        step = self.num_steps + 1
        refresh = (step - 1) % self.every == 0
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.enable_grad():
            loss, grads, estimates = self._derivatives(closure(), params, step, refresh)
        check_finite(step, gradient=grads, curvature=estimates)
        self.num_steps, self.num_curvature_steps = step, self.num_curvature_steps + int(refresh)
        found = dict(zip(map(id, params), zip(grads, estimates)))
        counted = total = 0
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if id(p) in found and found[id(p)][0] is not None:
                        counted += self._update(p, group, *found[id(p)])
                        total += p.numel()
        self._finish(counted, total)
        return loss.detach()

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["second_order"] = {"num_steps": self.num_steps, "num_curvature_steps": self.num_curvature_steps,
                               "generator": self.generator.get_state()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("second_order")
        if extra is None:
            raise ValueError(f"not a {type(self).__name__} state_dict (no 'second_order' entry)")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "second_order"})
        self.num_steps, self.num_curvature_steps = extra["num_steps"], extra["num_curvature_steps"]
        self.generator.set_state(extra["generator"])
