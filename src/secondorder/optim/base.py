"""The optimizer core every curvature-preconditioned optimizer here is built from.

A step is: evaluate the closures (one per micro-batch), let the optimizer's
:class:`~secondorder.optim.estimators.CurvatureEstimator` turn each into an
:class:`~secondorder.optim.estimators.Estimate` on refresh steps (a plain gradient otherwise),
sum over micro-batches and, through the step's :class:`~secondorder.distributed.reducer.Reducer`,
over ranks; unscale (GradScaler), average, combine; check everything; and only then let the
optimizer's update rule (a plain function of :mod:`secondorder.optim.updates`) change the
parameters. The step's facts travel in a :class:`~secondorder.optim.estimators.StepContext`,
never on the optimizer; a step that raises leaves parameters, state, counters and the probe
generator as they were.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Protocol, Sequence, cast

import torch
from torch import Tensor

from secondorder import validation
from secondorder.distributed.reducer import Reducer, check_option, digest, reducer_for
from secondorder.operators.products import check_dense
from secondorder.optim.estimators import CurvatureEstimator, Estimate, StepContext, check_same_closures

Closure = Callable[[], Any]
"""Returns the mean loss of the current batch (or what the estimator reads); it must not call ``backward``."""


def validate_common(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Reject hyperparameters every Adam-like optimizer shares, with what to do instead.

    ``eps`` must be positive: with ``eps = 0`` a coordinate with zero gradient and zero
    curvature (a dead ReLU) divides 0 by 0 and its parameter becomes NaN.
    """
    validation.non_negative(lr, "lr")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps > 0.0:
        raise ValueError(f"eps must be positive (eps = 0 makes 0/0 = NaN on coordinates with zero gradient and "
                         f"curvature), got {eps}")
    validation.non_negative(weight_decay, "weight_decay")


def curvature_period(curvature_every: int, old_name: str, old_value: int | None, depth: int = 1) -> int:
    """The refresh period, accepting the optimizer's former keyword with a deprecation warning.

    ``depth``: how many constructors lie between the user's call and this one (the warning names
    the user's line).
    """
    if old_value is not None:
        warnings.warn(f"{old_name}= is deprecated; use curvature_every= (the same meaning in every optimizer)",
                      DeprecationWarning, stacklevel=2 + depth)
        curvature_every = old_value
    return validation.positive_int(curvature_every, "curvature_every (steps between curvature refreshes)")


def checked_loss(loss: object, step: int) -> Tensor:
    """The closure's loss, or a clear error if it is not a scalar tensor with a graph.

    Finiteness is checked later, with the derivatives, in one device synchronisation per step.
    """
    loss = validation.scalar_loss(loss, f"the closure at step {step}", "return the scalar mean loss")
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


def _all_finite(*lists: Sequence) -> bool:
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


class SecondOrderOptimizer(torch.optim.Optimizer):
    """The step every curvature-preconditioned optimizer here shares (see the module docstring).

    A subclass passes its :class:`~secondorder.optim.estimators.CurvatureEstimator` and the state
    buffers it keeps, and implements :meth:`_update` with its update rule.

    Gradient accumulation: ``step([closure_1, ..., closure_n])`` takes one closure per micro-batch
    (each returning its micro-batch's mean loss; micro-batches count equally). Each is
    differentiated and its graph freed before the next; gradients and raw curvature quantities
    are averaged over all of them, with the same Hutchinson probes for every micro-batch, so the
    step equals the full-batch one. With a ``grad_scaler`` (``torch.amp.GradScaler``) the loss is
    scaled before differentiating and gradient and raw curvature are unscaled before use (no
    scale leaks into a denominator); an overflow skips the step and backs the scale off, and the
    scale grows after ``growth_interval`` good steps, through the scaler's public API. Probes come
    from the optimizer's own ``generator`` (seeded by ``seed``, on the parameters' device), which
    ``state_dict`` saves with the step counters: a resumed run is bitwise identical. Each
    parameter's state holds its own ``step`` and ``curvature_step`` counts (its bias corrections);
    the refresh schedule (steps 1, every + 1, 2 every + 1, ...) follows the optimizer's ``num_steps``.

    Data parallelism (``distributed``): with ``"auto"`` (default), whenever torch.distributed is
    initialized with more than one process, every step averages over the ranks, with equal
    weights, the gradient, the raw curvature quantities and the loss of all ``n W`` micro-batches
    (``W`` ranks, each passing the same number ``n`` of closures on its own shard). The local sums
    travel in one bucketed all-reduce per step (gradient and curvature in the same buffers on
    refresh steps). Every rank draws the same probes from its own copy of the generator (same
    ``seed``), never communicated, so with equal-size shards ``B_r`` of a batch ``B``,
    ``(1/W) sum_r grad mean_{B_r} l = grad mean_B l`` and ``(1/W) sum_r z * H_r z = z * H_B z``:
    the step is the single-process step on the concatenated batch (up to rounding) and all ranks
    keep identical parameters and state (with several closures per rank: the batch ordered
    micro-batch by micro-batch, each micro-batch's shards in rank order, which matters for
    SophiaG's sampled labels only). ``True`` requires an initialized process group; ``False``
    never communicates (each rank steps on its own data); a
    :class:`~secondorder.distributed.reducer.Reducer` is used as given. The first data-parallel
    step (and the first after :meth:`load_state_dict`) checks, in one ``all_gather_object``, that
    the ranks agree on the parameters' shapes and dtypes, the hyperparameters, the seed, the step
    counters and the generator state; any disagreement, or ranks passing different numbers of
    closures, raises ``ValueError`` on every rank. A rank that fails or dies makes the others
    raise :class:`~secondorder.distributed.DistributedError` within the group's timeout. The
    model may be wrapped in ``DistributedDataParallel`` or not: DDP's gradient hooks run on
    ``backward()`` only, so under ``torch.autograd.grad`` its reducer stays idle (its forward
    still broadcasts buffers) and this step does the averaging.
    """

    def __init__(self, params, defaults: dict, *, estimator: CurvatureEstimator, buffers: tuple[str, ...],
                 curvature_every: int, seed: int, grad_scaler=None, distributed: bool | str | Reducer = "auto"):
        super().__init__(params, defaults)
        self.distributed = check_option(distributed)
        self.estimator, self.buffers = estimator, buffers
        self.curvature_every, self.seed = curvature_every, validation.seed(seed)
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.num_steps = 0
        self.num_curvature_steps = 0
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.num_good_steps = 0  # since the last change of the loss scale
        self._agreed_world: int | None = None  # world size of the last successful handshake
        self.last_count: Tensor | int = 0  # what the last step's update rules counted (Sophia: clipped)
        self.last_total = 0  # coordinates the last step updated

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict],
                estimates: list[Tensor] | None) -> Tensor | int:
        """Update one group's parameters in place after the momentum (``estimates`` is None
        between curvature refreshes); returns a count summed over groups into ``last_count``.
        """
        raise NotImplementedError

    # ---- the step --------------------------------------------------------------------
    def step(self, closure: Closure | Sequence[Closure] | None = None) -> Tensor:  # type: ignore[override]
        """One step: ``closure()`` computes the loss (no ``backward``, no ``zero_grad``), or a list
        of closures, one per micro-batch. Returns the (mean) loss; data-parallel, the mean over
        all ranks' micro-batches, the same on every rank.
        """
        closures = [closure] if callable(closure) else list(closure or [])
        if not closures or not all(callable(c) for c in closures):
            raise ValueError(
                f"{type(self).__name__} computes its own gradient and Hessian-vector products: call "
                "step(closure) with closure() returning the loss, without calling backward "
                "(or step([closure, ...]) with one closure per micro-batch)"
            )
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        step = self.num_steps + 1
        reducer = self._reducer()
        if reducer.distributed:
            self._handshake(reducer, params)
        ctx = StepContext(step=step, refresh=(step - 1) % self.curvature_every == 0, num_closures=len(closures),
                          loss_scale=float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0,
                          reducer=reducer, generator=self.generator)
        probes_state = self.generator.get_state()
        try:
            return self._step(ctx, closures, params, probes_state)
        except BaseException:
            self.generator.set_state(probes_state)  # a refused step leaves no trace
            raise

    def _step(self, ctx: StepContext, closures: list[Closure], params: list[Tensor], probes_state: Tensor) -> Tensor:
        losses, grads, raw, weight = self._evaluate(ctx, closures, params, probes_state)
        n = len(closures)
        if not ctx.reducer.distributed:
            mean_loss = losses[0] if n == 1 else torch.stack(losses).mean()
        else:  # sums over the n W micro-batches of all ranks
            n *= ctx.reducer.size
            loss_sum, grads, raw, weight = self._sum_over_ranks(ctx, params, losses, grads, raw, weight)
            mean_loss = loss_sum / n
        if self.grad_scaler is not None:
            grads = _scale(grads, 1 / ctx.loss_scale)
            raw = self.estimator.unscale(raw, ctx.loss_scale) if ctx.refresh else raw
        if n > 1:
            grads, raw = _scale(grads, 1 / n), _scale(raw, 1 / n)
        estimates = self.estimator.combine(raw, weight) if ctx.refresh else raw
        if not _all_finite([mean_loss], grads, estimates):
            if not _all_finite([mean_loss]):
                raise FloatingPointError(
                    f"the loss at step {ctx.step} is {mean_loss.item()}; parameters were not changed")
            if self.grad_scaler is not None:
                self._rescale(ctx.loss_scale, found_inf=True)  # the scaled derivatives overflowed: skip
                return mean_loss
            check_finite(ctx.step, gradient=grads, curvature=estimates)
        self._apply(ctx, params, grads, estimates)
        if self.grad_scaler is not None:
            self._rescale(ctx.loss_scale, found_inf=False)
        return mean_loss

    def _evaluate(self, ctx: StepContext, closures: list[Closure], params: list[Tensor], probes_state: Tensor):
        """Per micro-batch: the checked loss and its derivatives, summed over the micro-batches."""
        losses: list[Tensor] = []
        grads: list | None = None
        raw: list | None = None
        weight: Tensor | None = None
        with torch.enable_grad():
            for i, micro in enumerate(closures):
                if i and ctx.refresh and self.estimator.same_probes_per_micro_batch:
                    self.generator.set_state(probes_state)
                out = micro()
                loss = checked_loss(self.estimator.loss_of(out), ctx.step)
                if self.grad_scaler is not None:
                    out = self.estimator.with_loss(out, self.grad_scaler.scale(loss))
                if ctx.refresh:
                    est = self.estimator.estimate(out, params, ctx)
                else:
                    est = Estimate(torch.autograd.grad(cast(Tensor, self.estimator.loss_of(out)), params,
                                                       allow_unused=True),
                                   [None] * len(params))
                check_dense(est.gradient, params, f" at step {ctx.step}")
                losses.append(loss.detach())
                grads, raw = _add(grads, est.gradient), _add(raw, est.curvature)
                if est.weight is not None:
                    weight = est.weight if weight is None else weight + est.weight
        return losses, grads, raw, weight

    def _sum_over_ranks(self, ctx: StepContext, params: list[Tensor], losses: list[Tensor], grads: list,
                        raw: list, weight: Tensor | None) -> tuple[Tensor, list, list, Tensor | None]:
        """The loss, gradient and (on refresh steps) raw curvature and weight summed over all ranks.

        One bucketed reduction of the gradients (zeros where a rank's loss does not depend on a
        parameter), the raw quantities, and a tail ``[loss, weight, present per parameter,
        closures per rank]``: a parameter keeps a ``None`` gradient only if no rank's loss
        depends on it.
        """
        reducer, k = ctx.reducer, len(params)
        loss = torch.stack(losses).sum()
        tail = torch.zeros(2 + k + reducer.size, dtype=loss.dtype, device=loss.device)
        tail[0] = loss
        if weight is not None:
            tail[1] = weight
        tail[2 : 2 + k] = torch.tensor([g is not None for g in grads], dtype=loss.dtype)
        tail[2 + k + reducer.rank] = len(losses)
        local = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        summed = reducer.sum(local + (list(raw) if ctx.refresh else []) + [tail],
                             what=f"{type(self).__name__} gradient and curvature")
        tail = summed[-1]
        present, closures = tail[2 : 2 + k].tolist(), tail[2 + k :].tolist()
        check_same_closures([round(c) for c in closures], ctx.step)
        grads = [g if here else None for g, here in zip(summed[:k], present)]
        return tail[0], grads, summed[k:-1] if ctx.refresh else raw, tail[1] if weight is not None else None

    def _apply(self, ctx: StepContext, params: list[Tensor], grads: list, estimates: list) -> None:
        """Momentum and the update rule, per group, for the parameters that have a gradient."""
        self.num_steps, self.num_curvature_steps = ctx.step, self.num_curvature_steps + int(ctx.refresh)
        found = dict(zip(map(id, params), zip(grads, estimates)))
        counted: Tensor | int = 0
        total = 0
        with torch.no_grad():
            for group in self.param_groups:
                live = [(p, *found[id(p)]) for p in group["params"] if id(p) in found and found[id(p)][0] is not None]
                if not live:
                    continue
                ps, gs, es = (list(column) for column in zip(*live))
                states = self._states(ps, ctx.refresh)
                exp_avgs = [s["exp_avg"] for s in states]
                torch._foreach_mul_(exp_avgs, group["betas"][0])
                torch._foreach_add_(exp_avgs, gs, alpha=1 - group["betas"][0])
                counted = counted + self._update(group, ps, gs, states, es if ctx.refresh else None)
                total += sum(p.numel() for p in ps)
        self.last_count, self.last_total = counted, total

    def _states(self, params: list[Tensor], refresh: bool) -> list[dict]:
        """The parameters' states (created at first use: momentum, the optimizer's buffers and the
        counters), counters advanced.
        """
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state.update({"step": 0, "curvature_step": 0, "exp_avg": torch.zeros_like(p)})
                state.update({name: torch.zeros_like(p) for name in self.buffers})
            state["step"] += 1
            state["curvature_step"] += int(refresh)
        return states

    # ---- data parallelism and mixed precision -----------------------------------------
    def _reducer(self) -> Reducer:
        """The reducer of this step (torch.distributed may have been initialized since construction)."""
        return reducer_for(self.distributed)

    def _handshake(self, reducer: Reducer, params: list[Tensor]) -> None:
        """Check once per world (and after loading a state) that every rank runs the same optimizer."""
        agree_once(self, reducer, lambda: {
            "optimizer": type(self).__name__,
            "parameters (shape, dtype, device type)": [
                (tuple(p.shape), str(p.dtype).removeprefix("torch."), p.device.type) for p in params],
            "hyperparameters": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "settings": {"curvature_every": self.curvature_every, **self.estimator.settings()},
            "seed": self.seed,
            "step counters": (self.num_steps, self.num_curvature_steps, self.num_good_steps),
            "probe generator state": digest(self.generator.get_state()),
            "loss scale": float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0,
        })

    def _rescale(self, loss_scale: float, found_inf: bool) -> None:
        assert self.grad_scaler is not None, "only called with a GradScaler"
        self.num_good_steps = rescale(self.grad_scaler, loss_scale, found_inf, self.num_good_steps)

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        out = super().state_dict()
        out["second_order"] = {"optimizer": type(self).__name__, "num_steps": self.num_steps,
                               "num_curvature_steps": self.num_curvature_steps,
                               "num_good_steps": self.num_good_steps, "generator": self.generator.get_state()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`, after checking that it fits; states saved
        before per-parameter counters existed get them from the optimizer's counters.

        Checked before anything changes (``ValueError`` naming what does not fit): the optimizer
        that wrote it (states written before it was recorded: by their buffers), the
        hyperparameter names of every group, and every saved buffer's shape and dtype against its
        parameter's, the counters and the generator state.
        """
        extra = self._checked_state(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "second_order"})
        self.num_steps, self.num_curvature_steps = extra["num_steps"], extra["num_curvature_steps"]
        self.num_good_steps = extra["num_good_steps"]
        self.generator.set_state(extra["generator"])
        for state in self.state.values():
            if state and "step" not in state:
                state["step"], state["curvature_step"] = self.num_steps, self.num_curvature_steps
        self._agreed_world = None  # the ranks must agree on the loaded state

    def _checked_state(self, state_dict: Any) -> dict:
        """The ``second_order`` entry of ``state_dict`` if the whole state fits this optimizer."""
        extra, params = check_groups(type(self).__name__, self.param_groups, state_dict)
        for key, state in state_dict.get("state", {}).items():
            if state and key in params:
                self._check_param_state(*params[key], state)
        self._check_counters(extra)
        return extra

    def _check_param_state(self, where: str, p: Tensor, state: dict) -> None:
        """One parameter's saved state: every buffer present, of the parameter's shape and dtype."""
        for buffer in ("exp_avg", *self.buffers):
            value = state.get(buffer)
            if not isinstance(value, Tensor):
                raise ValueError(f"the state of {where} has no {buffer!r} buffer (it holds {sorted(state)}): "
                                 f"it was not saved by {type(self).__name__}")
            if value.shape != p.shape or value.dtype != p.dtype:
                raise ValueError(
                    f"the {buffer!r} buffer of {where} is {str(value.dtype).removeprefix('torch.')} "
                    f"{list(value.shape)}, the parameter is {str(p.dtype).removeprefix('torch.')} {list(p.shape)}: "
                    "the state was saved on another model (or in another dtype: cast the model as it was saved, "
                    "load, then cast model and optimizer together)")

    def _check_counters(self, extra: dict) -> None:
        """The step counters are non-negative integers and the generator state fits the generator."""
        for counter in ("num_steps", "num_curvature_steps", "num_good_steps"):
            validation.non_negative_int(extra.get(counter), f"the state_dict's {counter}")
        check_generator(self.generator, extra.get("generator"))


class Agreeing(Protocol):
    """An optimizer that checks its ranks agree: the world size of its last successful
    handshake (``None``: none yet, or a state was loaded since).
    """

    _agreed_world: int | None


HANDSHAKE_ADVICE = "every rank must build the same model and optimizer (same seed) and load the same checkpoint"


def agree_once(optimizer: Agreeing, reducer: Reducer, facts: Callable[[], dict[str, Any]]) -> None:
    """The rank handshake of every optimizer here: unless the ranks already agreed in a world of
    ``reducer.size`` (and no state was loaded since, which sets ``_agreed_world`` to ``None``),
    check that they pass equal ``facts()`` (built only then: shapes, hyperparameters, counters,
    the generator's digest), or raise ``ValueError`` on every rank naming the first one they
    disagree on, with each rank's value.
    """
    if optimizer._agreed_world == reducer.size:
        return
    reducer.agree(facts(), what=f"{type(optimizer).__name__} handshake", advice=HANDSHAKE_ADVICE)
    optimizer._agreed_world = reducer.size


def rescale(scaler: Any, loss_scale: float, found_inf: bool, good_steps: int) -> int:
    """GradScaler's dynamic schedule (backoff on overflow, growth every interval), through its public
    API; returns the count of good steps since the scale last changed.
    """
    if found_inf:
        new, good_steps = loss_scale * scaler.get_backoff_factor(), 0
    else:
        good_steps += 1
        new = loss_scale
        if good_steps == scaler.get_growth_interval():
            new, good_steps = new * scaler.get_growth_factor(), 0
    scaler.update(new)
    return good_steps


def check_groups(name: str, groups: list[dict], state_dict: Any) -> tuple[dict, dict[Any, tuple[str, Tensor]]]:
    """The ``second_order`` entry of a ``state_dict`` for optimizer ``name`` with ``groups``, and
    the saved parameter keys' (description, parameter), once the writer, the group and parameter
    counts and every group's hyperparameter names fit (``ValueError`` naming what does not).
    """
    extra = state_dict.get("second_order") if isinstance(state_dict, dict) else None
    if not isinstance(extra, dict):
        raise ValueError(f"not a {name} state_dict (no 'second_order' entry)")
    writer = extra.get("optimizer", name)
    if writer != name:
        raise ValueError(f"this state_dict was saved by {writer}, not {name}: load it into a {writer}")
    saved_groups = state_dict.get("param_groups", [])
    if len(groups) != len(saved_groups):
        raise ValueError(f"the state_dict has {len(saved_groups)} parameter groups, this {name} has {len(groups)}")
    params: dict[Any, tuple[str, Tensor]] = {}
    for g, (group, saved) in enumerate(zip(groups, saved_groups)):
        want, got = set(group) - {"params"}, set(saved) - {"params"}
        if want != got:
            raise ValueError(f"parameter group {g} of the state_dict has the hyperparameters {sorted(got)}, "
                             f"{name} has {sorted(want)}: it was saved by another optimizer or version")
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"parameter group {g} of the state_dict has {len(saved['params'])} parameters, "
                             f"this {name}'s has {len(group['params'])}: it was saved on another model")
        params.update({key: (f"parameter {i} of group {g}", p)
                       for i, (key, p) in enumerate(zip(saved["params"], group["params"]))})
    return extra, params


def check_generator(generator: torch.Generator, state: Any) -> None:
    """``ValueError`` unless ``state`` is a state of a generator on ``generator``'s device (tried on a scratch one)."""
    scratch = torch.Generator(device=generator.device)
    try:
        scratch.set_state(state)
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"the state_dict's generator state does not fit a {generator.device.type} "
                         f"generator ({err})") from err
