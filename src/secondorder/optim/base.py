"""What the second-order optimizers share: the closure contract and hyperparameter checks."""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from secondorder.distributed.buckets import gather_counts, sum_over_ranks
from secondorder.distributed.process_group import World, agree, current_world

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
    scale grows after ``growth_interval`` good steps, through the scaler's public API. Probes come
    from the optimizer's own ``generator`` (seeded by ``seed``), which ``state_dict`` saves with
    the step counters: a resumed run is bitwise identical.

    Data parallelism (``distributed``): with ``"auto"`` (default), whenever torch.distributed is
    initialized with more than one process, every step averages over the ranks, with equal
    weights, the gradient, the raw curvature quantities and the loss of all ``n W`` micro-batches
    (``W`` ranks, each passing the same number ``n`` of closures on its own shard). The local sums
    travel in one bucketed all-reduce per step (:func:`~secondorder.distributed.buckets.sum_over_ranks`:
    gradient and curvature in the same buffers on refresh steps). Every rank draws the same
    probes from its own copy of the generator (same ``seed``), never communicated, so with
    equal-size shards ``B_r`` of a batch ``B``, ``(1/W) sum_r grad mean_{B_r} l = grad mean_B l``
    and ``(1/W) sum_r z * H_r z = z * H_B z``: the step is the single-process step on the
    concatenated batch (up to rounding) and all ranks keep identical parameters and state (with
    several closures per rank: the batch ordered micro-batch by micro-batch, each micro-batch's
    shards in rank order, which matters for SophiaG's sampled labels only). ``True`` requires an
    initialized process group; ``False`` never communicates (each rank steps on its own data).
    The first data-parallel step (and the first after :meth:`load_state_dict`) checks, in one
    ``all_gather_object``, that the ranks agree on the parameters' shapes and dtypes, the
    hyperparameters, the seed, the step counters and the generator state; any disagreement, or
    ranks passing different numbers of closures, raises ``ValueError`` on every rank. A rank that
    fails or dies makes the others raise :class:`~secondorder.distributed.DistributedError`
    within the group's timeout. The model may be wrapped in ``DistributedDataParallel`` or not:
    DDP's gradient hooks run on ``backward()`` only, so under ``torch.autograd.grad`` its reducer
    stays idle (its forward still broadcasts buffers) and this step does the averaging.
    """

    same_probes_per_micro_batch = True
    """Hutchinson estimators draw one probe set per step and apply it to every micro-batch."""

    def __init__(self, params, defaults: dict, every: int, seed: int, grad_scaler=None,
                 distributed: bool | str = "auto"):
        if not (distributed is True or distributed is False or distributed == "auto"):
            raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
        super().__init__(params, defaults)
        self.distributed = distributed
        self._agreed_world: int | None = None  # world size of the last successful handshake
        self._world: World | None = None  # the data-parallel world of the step in progress (None: local)
        self._num_closures = 0  # of the step in progress
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

    def _settings(self) -> dict:
        """Options outside the parameter groups that every rank must share."""
        return {"every": self.every}

    def _data_parallel_world(self) -> World | None:
        """The world the step averages over, or None for a local step."""
        world = current_world()
        if self.distributed is True and not world.distributed:
            raise ValueError(
                "distributed=True but torch.distributed is not initialized: call "
                "secondorder.distributed.init_from_env() first (under torchrun), or pass distributed='auto'"
            )
        return world if self.distributed is not False and world.size > 1 else None

    def _handshake(self, world: World, params: list[Tensor]) -> None:
        """Check once per world (and after loading a state) that every rank runs the same optimizer."""
        if self._agreed_world == world.size:
            return
        name = type(self).__name__
        agree({
            "optimizer": name,
            "parameters (shape, dtype, device type)": [
                (tuple(p.shape), str(p.dtype).removeprefix("torch."), p.device.type) for p in params],
            "hyperparameters": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "settings": self._settings(),
            "seed": self.seed,
            "step counters": (self.num_steps, self.num_curvature_steps, self.num_good_steps),
            "probe generator state": hashlib.sha256(self.generator.get_state().numpy().tobytes()).hexdigest()[:16],
            "loss scale": self.loss_scale,
        }, what=f"{name} handshake", advice="every rank must build the same model and optimizer (same seed) "
                                            "and load the same checkpoint")
        self._agreed_world = world.size

    def _check_closures(self, counts: list[int], step: int) -> None:
        if any(c != counts[0] for c in counts):
            raise ValueError(
                f"the ranks passed different numbers of closures to step {step}: "
                + ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
                + "; every rank must accumulate the same number of micro-batches"
            )

    def _shared_draws(self, count: int, device: torch.device) -> tuple[int, int]:
        """``(offset, total)``: where this rank's ``count`` random draws (one per item of the
        micro-batch in progress) lie among all ranks' draws, in rank order.

        Every rank draws ``total`` numbers from its generator, which stays identical on all ranks,
        and uses its slice, so the draws are those of one process on the concatenated micro-batch.
        ``(0, count)`` in a local step. One all-reduce of ``2 W`` integers.
        """
        if self._world is None:
            return 0, count
        everyone = gather_counts(count, self._num_closures, device=device,
                                 what=f"{type(self).__name__} sample counts")
        self._check_closures([c[1] for c in everyone], self.num_steps + 1)
        counts = [c[0] for c in everyone]
        return sum(counts[: self._world.rank]), sum(counts)

    def _sum_over_ranks(self, world: World, params: list[Tensor], losses: list[Tensor], grads: list,
                        raw: list, refresh: bool, step: int) -> tuple[Tensor, list, list]:
        """The loss, gradient and (on refresh steps) raw curvature summed over all ranks' micro-batches.

        One bucketed all-reduce of the gradients (zeros where a rank's loss does not depend on
        a parameter), the raw quantities, and a tail ``[loss, present per parameter, closures per
        rank]``: a parameter keeps a ``None`` gradient only if no rank's loss depends on it.
        """
        loss = torch.stack(losses).sum()
        tail = torch.zeros(1 + len(params) + world.size, dtype=loss.dtype, device=loss.device)
        tail[0] = loss
        tail[1 : 1 + len(params)] = torch.tensor([g is not None for g in grads], dtype=loss.dtype)
        tail[1 + len(params) + world.rank] = len(losses)
        local = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        summed = sum_over_ranks(local + (list(raw) if refresh else []) + [tail],
                                what=f"{type(self).__name__} gradient and curvature")
        tail = summed[-1]
        present, closures = tail[1 : 1 + len(params)].tolist(), tail[1 + len(params) :].tolist()
        self._check_closures([round(c) for c in closures], step)
        grads = [g if here else None for g, here in zip(summed[: len(params)], present)]
        return tail[0], grads, summed[len(params) : -1] if refresh else raw

    def _combine(self, raw: list, count: int) -> list:
        """Estimates from the raw quantities averaged over ``count`` micro-batches (default: as they are)."""
        return raw

    def _finish(self, counted, total: int) -> None:
        """Hook after a step with the summed return values of :meth:`_update` and the coordinate count."""

    def step(self, closure: Closure | Sequence[Closure] | None = None) -> Tensor:  # type: ignore[override]
        """One step: ``closure()`` computes the loss (no ``backward``, no ``zero_grad``), or a list
        of closures, one per micro-batch. Returns the (mean) loss; data-parallel, the mean over
        all ranks' micro-batches, the same on every rank."""
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
        self.loss_scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        world = self._data_parallel_world()
        if world is not None:
            self._handshake(world, params)
        self._world, self._num_closures = world, len(closures)
        probes_state = self.generator.get_state()
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
        if world is None:
            mean_loss = losses[0] if n == 1 else torch.stack(losses).mean()
        else:  # sums over the n W micro-batches of all ranks
            n *= world.size
            loss_sum, grads, raw = self._sum_over_ranks(world, params, losses, grads, raw, refresh, step)
            mean_loss = loss_sum / n
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
        self._agreed_world = None  # the ranks must agree on the loaded state
