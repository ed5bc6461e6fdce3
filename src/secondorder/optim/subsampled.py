r"""The core of the Newton-type optimizers with a full gradient and a sub-sampled Hessian.

Xu, Roosta & Mahoney ("Newton-type methods for non-convex optimization under inexact Hessian
information", Math. Programming 2020; "Second-order optimization for non-convex machine
learning: an empirical study", SDM 2020) and Roosta, Liu, Xu & Mahoney (Newton-MR, 2018; Liu &
Roosta 2022) minimize a finite sum :math:`F(x) = \frac1n\sum_i f_i(x)` with the **full**
gradient and function values, and the Hessian of a uniform sample :math:`S` drawn without
replacement, :math:`H_S = \frac1{|S|}\sum_{i\in S}\nabla^2 f_i(x)`, fixed across the trial steps
of one iteration and redrawn at the next.

The closure convention: ``closure(indices=None)`` returns the **per-sample** losses ``[n]`` of the
batch (``reduction="none"``), or of the samples ``indices`` (a ``LongTensor`` of positions in the
batch) only; with ``curvature="gauss-newton"`` it returns ``(losses, outputs)``, the model's
outputs of those samples, the losses computed from that very ``outputs`` tensor (a forward split
into chunks must join its outputs first: the Gauss-Newton products differentiate the losses
with respect to it). It must not call ``backward``. A step calls it once for the gradient,
once on the sample (a graph the curvature products differentiate again) and once per trial point
under ``torch.no_grad()``.

**Propagations** count what the papers plot on their x-axes: a sample forward pass is 1 and a
forward plus backward is 2, so a full gradient costs :math:`2n`, a function value :math:`n`, the
sample's gradient graph :math:`2|S|` and each curvature product :math:`2|S|` (Xu et al.'s
non-linear least squares code; its network code counts a gradient as :math:`n`). Every step
records them, with the counts they come from, in ``optimizer.last_step``.

Data-parallel (``distributed="auto"``): each rank's closure covers its shard. The per-sample
losses are summed over the ranks with the sample counts, the sample :math:`S` is drawn over the
concatenated batch (rank order) from the optimizer's generator, the same on every rank, and each
rank differentiates the part of :math:`S` in its shard; gradient, function values and every
curvature product are summed over the ranks, so the step is the single process's step on the
concatenated batch, and every rank holds the same parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from secondorder import validation
from secondorder.distributed.reducer import Reducer, check_option, digest, reducer_for
from secondorder.linalg.results import Serializable
from secondorder.operators.base import LinearOperator, _single_block
from secondorder.operators.params import split_rows
from secondorder.optim.base import agree_once, check_generator, check_groups

CURVATURES = ("hessian", "gauss-newton")


@dataclass(frozen=True, eq=False)
class NewtonStep(Serializable):
    r"""What one step of a Newton-type optimizer did, for the curves a researcher plots.

    ``loss`` is the full-batch loss before the step and ``new_loss`` after it (equal when no
    step was taken); ``accepted`` whether the parameters moved; ``trials`` the trial points
    evaluated (trust region and ARC: one per sub-problem; Newton-MR: line-search points);
    ``ratio`` the last trial's actual over predicted decrease :math:`\rho` (``None`` for
    Newton-MR, and when no trial had a finite loss and a predicted decrease); ``radius``, ``sigma`` or ``step_size`` the method's parameter after the step;
    ``exit`` the last sub-problem's exit; ``subproblem_iterations`` summed over trials;
    ``hessian_samples`` :math:`|S|` of ``samples``; the costs ``gradient_evaluations``,
    ``function_evaluations``, ``hessian_products`` and ``propagations`` (module docstring).
    """

    loss: float
    new_loss: float
    accepted: bool
    trials: int
    ratio: float | None
    radius: float | None
    sigma: float | None
    step_size: float | None
    step_norm: float
    exit: str
    subproblem_iterations: int
    samples: int
    hessian_samples: int
    gradient_evaluations: int
    function_evaluations: int
    hessian_products: int
    propagations: int


def losses_of(out: Any, curvature: str, where: str) -> tuple[Tensor, Tensor | None]:
    """The per-sample losses (and with Gauss-Newton the outputs) a closure returned, checked."""
    outputs = None
    if curvature == "gauss-newton":
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, Tensor) for o in out)):
            raise ValueError(f"{where} must return (per-sample losses, outputs) with curvature='gauss-newton'")
        out, outputs = out
    if not isinstance(out, Tensor) or out.ndim != 1 or not out.is_floating_point():
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{where} must return the per-sample losses, a vector [n] (a loss with reduction='none'), "
                         f"got {shape}: the optimizer averages them and sub-samples them for the Hessian")
    return out, outputs


class SampledCurvature(LinearOperator):
    r"""The Hessian (or Gauss-Newton matrix) of :math:`\frac1{|S|}\sum_{i\in S} f_i` from one graph.

    ``loss`` is this rank's part of the sample's summed loss divided by :math:`|S|` (``None``
    when the rank holds none of the sample: its products are zeros); products are summed over
    ``reducer``'s ranks. Gauss-Newton: :math:`G v = J^\top \nabla^2_{o}\ell\, J v` with ``outputs``
    :math:`o`, :math:`Jv` by the double-backward trick.
    """

    def __init__(self, loss: Tensor | None, outputs: Tensor | None, params: Sequence[Tensor], reducer: Reducer,
                 curvature: str) -> None:
        self.params, self.reducer, self.curvature = list(params), reducer, curvature
        P = sum(p.numel() for p in params)
        self.shape, self.dtype, self.device = (P, P), params[0].dtype, params[0].device
        self.blocks = _single_block(P)
        self.graph: tuple = ()
        if loss is None:
            return
        if curvature == "hessian":
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            self.graph = (grads,)
        else:
            assert outputs is not None, "checked by losses_of"
            dummy = torch.zeros_like(outputs, requires_grad=True)
            jt_dummy = torch.autograd.grad(outputs, self.params, dummy, create_graph=True, allow_unused=True)
            (d_out,) = torch.autograd.grad(loss, outputs, create_graph=True)
            self.graph = (outputs, dummy, jt_dummy, d_out)

    def _column(self, v: Tensor) -> Tensor:
        if not self.graph:
            return torch.zeros_like(v)
        pieces = [piece[0] for piece in split_rows(v.unsqueeze(0), self.params)]
        with torch.enable_grad():
            if self.curvature == "hessian":
                (grads,) = self.graph
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                if not live:
                    return torch.zeros_like(v)
                parts = torch.autograd.grad([grads[i] for i in live], self.params, [pieces[i] for i in live],
                                            retain_graph=True, allow_unused=True)
            else:
                outputs, dummy, jt_dummy, d_out = self.graph
                live = [i for i, g in enumerate(jt_dummy) if g is not None]
                (jv,) = torch.autograd.grad([jt_dummy[i] for i in live], dummy, [pieces[i] for i in live],
                                            retain_graph=True)
                (hjv,) = torch.autograd.grad(d_out, outputs, jv, retain_graph=True)
                parts = torch.autograd.grad(outputs, self.params, hjv, retain_graph=True, allow_unused=True)
        return flat(parts, self.params)

    def _matmat(self, V: Tensor) -> Tensor:
        local = torch.stack([self._column(V[:, k]) for k in range(V.shape[1])], dim=1)
        return self.reducer.sum([local], what="sub-sampled curvature product")[0]


def flat(parts: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """One vector of per-parameter pieces (zeros where a piece is ``None``)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(parts, params)])


class SubsampledNewton(torch.optim.Optimizer):
    """The step every full-gradient, sub-sampled-Hessian optimizer here shares (module docstring).

    A subclass implements :meth:`_iterate`: given the full loss and gradient and the sampled
    curvature operator, try steps (through :meth:`_try`) and return the step's record. A step
    that raises leaves the parameters and the generator as they were.
    """

    def __init__(self, params, defaults: dict, *, hessian_fraction: float, curvature: str, seed: int,
                 distributed: bool | str | Reducer) -> None:
        fraction = validation.positive_finite(hessian_fraction, "hessian_fraction")
        if fraction > 1:
            raise ValueError(f"hessian_fraction is the fraction of the batch in the Hessian sample, in (0, 1], "
                             f"got {hessian_fraction}")
        super().__init__(params, {**defaults, "hessian_fraction": fraction})
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} takes one parameter group: its sub-problem couples all "
                             "parameters")
        self.curvature = validation.one_of(curvature, "curvature", CURVATURES)
        self.distributed = check_option(distributed)
        self.seed = validation.seed(seed)
        device = next((p.device for p in self.param_groups[0]["params"]), torch.device("cpu"))
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self.num_steps = 0
        self.last_step: NewtonStep | None = None
        self._agreed_world: int | None = None

    # ---- the parameters --------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for p in self.param_groups[0]["params"] if p.requires_grad]

    def _place(self, params: list[Tensor], step: Tensor | None = None, alpha: float = 1.0) -> None:
        """Set the parameters to the step's origin :math:`x` plus ``alpha`` ``step`` (to :math:`x`
        itself without ``step``), bitwise.

        Through ``.data``: the sample's graph saved tensors that alias the parameters, and its
        products are taken at :math:`x` only, after the parameters were set back to exactly
        :math:`x`, so the trial moves must not invalidate the graph's version counters.
        """
        pieces = split_rows(step.unsqueeze(0), params) if step is not None else [None] * len(params)
        with torch.no_grad():
            for p, x, piece in zip(params, self._origin, pieces):
                p.data.copy_(x if piece is None else x + alpha * piece[0])

    # ---- evaluations -------------------------------------------------------------------------
    def _loss_and_gradient(self, closure: Callable, params: list[Tensor], reducer: Reducer) -> tuple[float, Tensor, list[int]]:
        """The full-batch mean loss and gradient (over all ranks) and every rank's sample count."""
        with torch.enable_grad():
            losses, _ = losses_of(closure(), self.curvature, f"the closure at step {self.num_steps + 1}")
            if not losses.requires_grad:
                raise ValueError("the closure's losses do not depend on the parameters (no graph): compute them "
                                 "inside the closure, outside torch.no_grad(), and do not call backward")
            total = losses.sum()
            grad = flat(torch.autograd.grad(total, params, allow_unused=True), params)
        counts = [c[0] for c in reducer.counts(losses.numel(), device=grad.device, what="batch sizes")]
        grad, (loss_sum,) = reducer.sum_with_totals(grad, float(total.detach()), what="full gradient")
        n = sum(counts)
        if n == 0:
            raise ValueError("the batch is empty: the closure returned no losses")
        loss, grad = loss_sum / n, grad / n
        if not (math.isfinite(loss) and bool(torch.isfinite(grad).all())):
            raise FloatingPointError(f"the loss ({loss}) or its gradient at step {self.num_steps + 1} is not finite; "
                                     "parameters were not changed")
        return loss, grad, counts

    def _loss_at(self, closure: Callable, reducer: Reducer) -> float:
        """The full-batch mean loss at the current parameters (NaN counts as a failed trial)."""
        with torch.no_grad():
            losses, _ = losses_of(closure(), self.curvature, "the closure")
        _, (total, n) = reducer.sum_with_totals(torch.zeros(1, dtype=torch.float64, device=losses.device),
                                                float(losses.sum()),
                                                losses.numel(), what="trial loss")
        return total / n

    def _sample(self, counts: list[int], reducer: Reducer) -> tuple[Tensor | None, int]:
        """This rank's positions of the Hessian sample (``None``: all of its batch) and :math:`|S|`."""
        n = sum(counts)
        fraction = self.param_groups[0]["hessian_fraction"]
        size = n if fraction == 1 else max(1, math.ceil(fraction * n))
        if size == n:
            return None, n
        chosen = torch.randperm(n, generator=self.generator, device=self.generator.device)[:size].sort().values
        start = sum(counts[: reducer.rank])
        mine = chosen[(chosen >= start) & (chosen < start + counts[reducer.rank])] - start
        return mine, size

    def _curvature(self, closure: Callable, params: list[Tensor], counts: list[int],
                   reducer: Reducer) -> tuple[SampledCurvature, int]:
        """The curvature operator of the step's sample, and :math:`|S|`."""
        mine, size = self._sample(counts, reducer)
        loss = outputs = None
        if mine is None or mine.numel():
            with torch.enable_grad():
                losses, outputs = losses_of(closure() if mine is None else closure(mine.to(params[0].device)),
                                            self.curvature, "the closure on the Hessian sample")
                loss = losses.sum() / size
        return SampledCurvature(loss, outputs, params, reducer, self.curvature), size

    # ---- the step ------------------------------------------------------------------------------
    def step(self, closure: Callable | None = None) -> float:  # type: ignore[override]
        """One outer iteration; returns the full-batch loss before it. ``closure`` as in the module docstring."""
        if not callable(closure):
            raise ValueError(f"{type(self).__name__} needs step(closure) with closure(indices=None) returning the "
                             "per-sample losses of the batch (or of the samples indices), without backward")
        params = self._params()
        reducer = reducer_for(self.distributed)
        if reducer.distributed:
            self._handshake(reducer, params)
        self._origin = [p.detach().clone() for p in params]
        generator_state = self.generator.get_state()
        try:
            loss, grad, counts = self._loss_and_gradient(closure, params, reducer)
            H, size = self._curvature(closure, params, counts, reducer)
            self._costs = {"n": sum(counts), "s": size, "functions": 0}
            record = self._iterate(closure, params, loss, grad, H, reducer)
        except BaseException:
            self._place(params)
            self.generator.set_state(generator_state)
            raise
        finally:
            del self._origin
        self.num_steps += 1
        self.last_step = record
        return loss

    def _iterate(self, closure: Callable, params: list[Tensor], loss: float, grad: Tensor, H: SampledCurvature,
                 reducer: Reducer) -> NewtonStep:
        raise NotImplementedError

    def _try(self, closure: Callable, params: list[Tensor], step: Tensor, reducer: Reducer,
             alpha: float = 1.0) -> float:
        """Set the parameters to :math:`x` + ``alpha`` ``step`` and return the full loss there
        (the caller sets them back with :meth:`_place` if it rejects the point).
        """
        self._place(params, step, alpha)
        self._costs["functions"] += 1
        return self._loss_at(closure, reducer)

    def _record(self, H: SampledCurvature, **fields: Any) -> NewtonStep:
        """The step's record with its costs (module docstring's propagations)."""
        n, s, functions = self._costs["n"], self._costs["s"], self._costs["functions"]
        products = H.num_matvecs
        return NewtonStep(samples=n, hessian_samples=s, gradient_evaluations=1, function_evaluations=functions,
                          hessian_products=products, propagations=2 * n + n * functions + 2 * s * (1 + products),
                          **fields)

    # ---- data parallelism and checkpoints ----------------------------------------------------------
    def _handshake(self, reducer: Reducer, params: list[Tensor]) -> None:
        """Check once per world (and after loading a state) that every rank runs the same optimizer."""
        agree_once(self, reducer, lambda: {
            "optimizer": type(self).__name__,
            "parameters (shape, dtype)": [(tuple(p.shape), str(p.dtype)) for p in params],
            "hyperparameters": {k: v for k, v in self.param_groups[0].items() if k != "params"},
            "state": self._scalars(), "curvature": self.curvature, "seed": self.seed,
            "generator state": digest(self.generator.get_state()),
        })

    def _scalars(self) -> dict:
        """The method's own state between steps (radius, sigma, step size), saved with the counters."""
        return {}

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["second_order"] = {"optimizer": type(self).__name__, "num_steps": self.num_steps,
                               "generator": self.generator.get_state(), **self._scalars()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`, after checking (writer, hyperparameter names,
        parameter counts, counters, generator, the method's state) that it fits.
        """
        extra, _ = check_groups(type(self).__name__, self.param_groups, state_dict)
        validation.non_negative_int(extra.get("num_steps"), "the state_dict's num_steps")
        check_generator(self.generator, extra.get("generator"))
        own = {}
        for key in self._scalars():
            value = extra.get(key)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"the state_dict's {key} must be a positive number, got {value!r}")
            own[key] = float(value)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "second_order"})
        self.num_steps = extra["num_steps"]
        self.generator.set_state(extra["generator"])
        self._load_scalars(own)
        self._agreed_world = None

    def _load_scalars(self, values: dict) -> None:
        """Restore what :meth:`_scalars` saved."""
