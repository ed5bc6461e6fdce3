"""What the second-order optimizers share: the closure contract and hyperparameter checks."""

from __future__ import annotations

import math
from typing import Callable, Sequence

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
    """The closure's loss, or a clear error if it is not a scalar tensor with a graph.

    Finiteness is checked later, with the derivatives, in one device synchronisation per step.
    """
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the closure must return the scalar mean loss; at step {step} it returned {shape}")
    if not loss.requires_grad:
        raise ValueError(
            f"the loss at step {step} does not depend on the parameters (no graph): compute it inside the "
            "closure, outside torch.no_grad(), and do not call backward"
        )
    return loss


def check_finite(step: int, **named: list | tuple) -> None:
    """Raise, naming the first non-finite list (gradient, curvature, ...) and the step.

    The step runs one fused check of everything first and calls this only when it failed.
    """
    for name, tensors in named.items():
        if not _all_finite(tensors):
            raise FloatingPointError(f"the {name} at step {step} is not finite; parameters were not changed")


def _add(acc: list | None, new) -> list:
    """Element-wise sum of two lists of optional tensors (``None`` is zero)."""
    if acc is None:
        return list(new)
    return [a if b is None else (b if a is None else a + b) for a, b in zip(acc, new)]


def _all_finite(*lists: list) -> bool:
    """Whether every tensor in the lists is finite, with one synchronisation per device.

    The infinity norm of a tensor is finite exactly when all its entries are, and
    ``_foreach_norm`` computes all of them in a few fused kernels.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for values in lists:
        for t in values:
            if t is not None and t.numel():
                by_device.setdefault(t.device, []).append(t if t.is_floating_point() else t.double())
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(ts, math.inf))).all())
               for ts in by_device.values())


def _scale(values: list, factor: float) -> list:
    return [None if v is None else v * factor for v in values]


def gradient_only(loss: Tensor, params: list[Tensor]) -> tuple[Tensor, tuple, list]:
    """``(loss, gradient, no curvature)`` for the steps between curvature refreshes: a plain backward."""
    return loss, torch.autograd.grad(loss, params, allow_unused=True), [None] * len(params)


class SecondOrderOptimizer(torch.optim.Optimizer):
    """The step every curvature-preconditioned optimizer here shares.

    ``step(closure)`` evaluates the closure, asks :meth:`_derivatives` for the loss, the gradient
    and, on curvature steps (1, every+1, 2 every+1, ...), per-parameter raw curvature quantities;
    :meth:`_combine` turns those into the estimates; everything is checked before any parameter
    changes; then :meth:`_update` runs per parameter.

    Gradient accumulation: ``step([closure_1, ..., closure_n])`` takes one closure per micro-batch
    (each returning its micro-batch's mean loss; micro-batches count equally). Each is
    differentiated and its graph freed before the next; gradients and raw curvature quantities
    are averaged over all of them, with the same Hutchinson probes for every micro-batch, so the
    step equals the full-batch one. With a ``grad_scaler`` (``torch.amp.GradScaler``) the loss is
    scaled before differentiating and gradient and raw curvature are unscaled before use (no
    scale leaks into a denominator); an overflow skips the step and backs the scale off, and the
    scale grows after ``growth_interval`` good steps, through the scaler's public API. Probes come from the optimizer's own ``generator`` (seeded by
    ``seed``), which ``state_dict`` saves with the step counters: a resumed run is bitwise identical.
    """

    same_probes_per_micro_batch = True
    """Hutchinson estimators draw one probe set per step and apply it to every micro-batch."""

    def __init__(self, params, defaults: dict, every: int, seed: int, grad_scaler=None):
        super().__init__(params, defaults)
        self.every, self.seed = every, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.num_steps = 0
        self.num_curvature_steps = 0
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.num_good_steps = 0  # since the last change of the loss scale
        self.loss_scale = 1.0  # of the step in progress

    # ---- hooks for the closure's output and mixed-precision loss scaling ---------------
    def _loss_of(self, out: object) -> object:
        """The loss in what the closure returned."""
        return out

    def _with_loss(self, out: object, loss: Tensor) -> object:
        """The closure's output with its loss replaced (by the scaled loss)."""
        return loss

    def _unscale(self, raw: list, scale: float) -> list:
        """Raw curvature quantities computed from the scaled loss, brought back to the loss's scale."""
        return _scale(raw, 1.0 / scale)

    def _rescale(self, found_inf: bool) -> None:
        """GradScaler's dynamic schedule (backoff on overflow, growth every interval), through its public API."""
        s = self.grad_scaler
        if found_inf:
            new, self.num_good_steps = self.loss_scale * s.get_backoff_factor(), 0
        else:
            self.num_good_steps += 1
            new = self.loss_scale
            if self.num_good_steps == s.get_growth_interval():
                new, self.num_good_steps = new * s.get_growth_factor(), 0
        s.update(new)

    def _derivatives(self, out: object, params: list[Tensor], step: int, refresh: bool) -> tuple[Tensor, tuple, list]:
        raise NotImplementedError

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], estimates: list[Tensor] | None):
        """Update one group's parameters in place (``estimates`` is None between curvature refreshes).

        Returns a count (a number or a 0-d tensor, summed over groups and given to :meth:`_finish`).
        """
        raise NotImplementedError

    def _momentum(self, params: list[Tensor], grads: list[Tensor], beta1: float, curvature_key: str) -> list[dict]:
        """The parameters' states (created at first use: momentum and a curvature buffer), momenta updated."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state[curvature_key] = torch.zeros_like(p)
        exp_avgs = [state["exp_avg"] for state in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        return states

    def _combine(self, raw: list, count: int) -> list:
        """Estimates from the raw quantities averaged over ``count`` micro-batches (default: as they are)."""
        return raw

    def _finish(self, counted, total: int) -> None:
        """Hook after a step with the summed return values of :meth:`_update` and the coordinate count."""

    def step(self, closure: Closure | Sequence[Closure] | None = None) -> Tensor:  # type: ignore[override]
        """One step: ``closure()`` computes the loss (no ``backward``, no ``zero_grad``), or a list
        of closures, one per micro-batch. Returns the (mean) loss."""
        closures = [closure] if callable(closure) else list(closure or [])
        if not closures or not all(callable(c) for c in closures):
            raise ValueError(
                f"{type(self).__name__} computes its own gradient and Hessian-vector products: call "
                "step(closure) with closure() returning the loss, without calling backward "
                "(or step([closure, ...]) with one closure per micro-batch)"
            )
        step = self.num_steps + 1
        refresh = (step - 1) % self.every == 0
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        probes_state = self.generator.get_state()
        self.loss_scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        losses, grads, raw = [], None, None
        with torch.enable_grad():
            for i, micro in enumerate(closures):
                if i and refresh and self.same_probes_per_micro_batch:
                    self.generator.set_state(probes_state)
                out = micro()
                loss = checked_loss(self._loss_of(out), step)
                if self.grad_scaler is not None:
                    out = self._with_loss(out, self.grad_scaler.scale(loss))
                _, g, r = self._derivatives(out, params, step, refresh)
                losses.append(loss.detach())
                grads, raw = _add(grads, g), _add(raw, r)
        n = len(closures)
        mean_loss = losses[0] if n == 1 else torch.stack(losses).mean()
        if self.grad_scaler is not None:
            grads = _scale(grads, 1 / self.loss_scale)
            raw = self._unscale(raw, self.loss_scale) if refresh else raw
        if n > 1:
            grads, raw = _scale(grads, 1 / n), _scale(raw, 1 / n)
        estimates = self._combine(raw, n) if refresh else raw
        if not _all_finite([mean_loss], grads, estimates):
            if not _all_finite([mean_loss]):
                raise FloatingPointError(
                    f"the loss at step {step} is {mean_loss.item()}; parameters were not changed")
            if self.grad_scaler is not None:
                self._rescale(found_inf=True)  # the scaled derivatives overflowed: skip, as GradScaler does
                return mean_loss
            check_finite(step, gradient=grads, curvature=estimates)
        self.num_steps, self.num_curvature_steps = step, self.num_curvature_steps + int(refresh)
        found = dict(zip(map(id, params), zip(grads, estimates)))
        counted, total = 0, 0
        with torch.no_grad():
            for group in self.param_groups:
                live = [(p, *found[id(p)]) for p in group["params"] if id(p) in found and found[id(p)][0] is not None]
                if live:
                    ps, gs, es = (list(column) for column in zip(*live))
                    counted = counted + self._update(group, ps, gs, es if refresh else None)
                    total += sum(p.numel() for p in ps)
        self._finish(counted, total)
        if self.grad_scaler is not None:
            self._rescale(found_inf=False)
        return mean_loss

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["second_order"] = {"num_steps": self.num_steps, "num_curvature_steps": self.num_curvature_steps,
                               "num_good_steps": self.num_good_steps, "generator": self.generator.get_state()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("second_order")
        if extra is None:
            raise ValueError(f"not a {type(self).__name__} state_dict (no 'second_order' entry)")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "second_order"})
        self.num_steps, self.num_curvature_steps = extra["num_steps"], extra["num_curvature_steps"]
        self.num_good_steps = extra["num_good_steps"]
        self.generator.set_state(extra["generator"])
