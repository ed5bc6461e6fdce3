r"""M-FAC, the sliding-window optimizer of Frantar, Kurtic & Alistarh ("M-FAC: Efficient
Matrix-Free Approximations of Second-Order Information", NeurIPS 2021): preconditioned SGD with
the damped empirical Fisher of the last :math:`m` gradients.

Each step forms the flat gradient :math:`g_t` of the closure's loss over all parameters (plus
:math:`w\,\theta_t` with weight decay :math:`w`, as in the authors' driver) and **inserts it into
the window first** (:meth:`~secondorder.operators.mfac.MFACOperator.add`: the oldest of the
:math:`m` rows is replaced), then steps along

.. math:: d_t = \hat F_t^{-1} g_t,\qquad
          \hat F_t = \lambda I + \tfrac1m \textstyle\sum_{i=t-m+1}^{t} g_i g_i^\top
                   = \lambda I + \tfrac1m G_t^\top G_t,\qquad
          \hat F_t^{-1} g = \lambda^{-1}\big(g - G_t^\top (G_tG_t^\top + m\lambda I_m)^{-1} G_t g\big)

(rows of steps not yet taken are zero, the :math:`1/m` stays: the authors' convention), with
the authors' momentum, an exponential average :math:`v_t = \mu v_{t-1} + (1-\mu) d_t`
(:math:`v_0 = 0`; :math:`\mu = 0` steps along :math:`d_t` itself), and
:math:`\theta_{t+1} = \theta_t - \eta\, v_t`. The window is
:class:`~secondorder.operators.mfac.MFACOperator`: an inverse product costs
:math:`O(dm + m^2)`, an insertion :math:`O(dm + m^3)`, the memory is :math:`md` floats (half
with ``storage_dtype=torch.float16``/``bfloat16``); ``block_size`` makes :math:`\hat F` block
diagonal over chunks of that many consecutive coordinates of the flat parameter vector. Since
:math:`g_t` itself is in the window, :math:`\hat F_t^{-1} g_t` stays well scaled even for the
paper's small :math:`\lambda` (outside the span of the window the inverse is :math:`\lambda^{-1}`);
but its float32 arithmetic cancels two terms of size :math:`\lambda^{-1}\|g\|`, a relative error of
about :math:`\varepsilon\kappa`, :math:`\kappa = \lambda_{\max}(GG^\top)/(m\lambda)`
(:mod:`secondorder.operators.mfac`; ``experiments/mfac_exactness.py``): with large gradients
and tiny damping use float64 parameters or a larger ``damping``.

**Defaults.** The authors' driver uses :math:`m = 1024`, :math:`\lambda = 10^{-5}`,
:math:`\eta = 10^{-3}` and no momentum, on a GPU. :math:`m = 1024` keeps 1024 copies of the
model, so this CPU library defaults to ``window=32`` (the small end of the 16-128 a CPU run
affords; at :math:`m = 32` an insertion's :math:`m^3` refactorization is negligible next to the
:math:`O(dm)` products) and keeps the driver's ``damping=1e-5``, ``lr=1e-3`` and ``momentum=0``.
The window is kept in float64 when every parameter is float64, float32 otherwise.

**The closure** returns the batch's mean loss (no ``backward``, no ``zero_grad``), as for
AdaHessian and Sophia, or ``(loss, outputs)`` as for SophiaG and KFAC: ``outputs`` the model's
outputs ``[batch, ...]`` (or an int), whose first dimension is the batch's sample count
:math:`n`. ``step([closure, ...])`` takes one closure per micro-batch. The gradient of the step
is the sample-weighted mean :math:`g = \sum_k n_k g_k / \sum_k n_k` over micro-batches (and
ranks); a bare loss counts as :math:`n = 1`, so equal-sized micro-batches and shards are weighted
equally, as by AdaHessian and Sophia, and unequal ones need ``(loss, outputs)``; every closure of
a step must return the same form. The step returns the mean loss, weighted the same way.

**Data-parallel** (``distributed="auto"``): each rank's closures cover its shard; one bucketed
all-reduce per step sums the sample-weighted gradients :math:`n_r g_r`, losses and counts
:math:`n_r`, divided by :math:`N = \sum_r n_r` after it. Every rank inserts the same averaged
gradient into its window, so every rank holds the same window, direction and parameters, equal
to one process on the concatenated batch (up to rounding). The first data-parallel step (and the
first after :meth:`MFAC.load_state_dict`) checks that the ranks agree on parameters, settings,
counters and a digest of the window.

With a ``grad_scaler`` (``torch.amp.GradScaler``) the loss is scaled before differentiating and
the gradient unscaled before it enters the window; an overflow skips the step (nothing is
inserted) and backs the scale off. Without one, a non-finite loss or gradient raises
``FloatingPointError`` before anything changes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from secondorder import validation
from secondorder.distributed.reducer import Reducer, check_option, digest, reducer_for
from secondorder.operators.mfac import MFACOperator
from secondorder.optim.base import agree_once, check_groups, checked_loss, rescale
from secondorder.optim.subsampled import flat

__all__ = ["MFAC"]

STORAGE = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MFAC(torch.optim.Optimizer):
    r"""M-FAC (module docstring).

    Args:
        params: the parameters (or parameter groups: ``lr``, ``momentum`` and ``weight_decay`` may
            differ between groups; the window covers all parameters together).
        lr: :math:`\eta` (1e-3, the authors').
        damping: :math:`\lambda > 0` of :math:`\hat F = \lambda I + \frac1m G^\top G` (1e-5, the authors').
        window: :math:`m`, the number of gradients kept (32 for a CPU library; the authors' GPU driver 1024).
        momentum: :math:`\mu \in [0, 1)` of the exponential average of the directions (0).
        weight_decay: :math:`w`, added to the gradient before it enters the window (0).
        block_size: chunks of this many consecutive coordinates of the flat parameter vector, each its
            own block of :math:`\hat F` (``None``: one block).
        storage_dtype: the window's dtype (default the products' dtype; float16/bfloat16 halve its memory).
        grad_scaler: a ``torch.amp.GradScaler``: an overflow skips the step and backs the scale off.
        distributed: ``"auto"``, True, False or a :class:`~secondorder.distributed.reducer.Reducer`.

    Attributes:
        operator: the window, an :class:`~secondorder.operators.mfac.MFACOperator` (its
            ``inverse()``, ``inverse_diagonal()`` and products are the current :math:`\hat F`'s).
        num_steps: steps taken (gradients inserted); ``num_good_steps``: since the loss scale last changed.

    """

    def __init__(self, params, *, lr: float = 1e-3, damping: float = 1e-5, window: int = 32, momentum: float = 0.0,
                 weight_decay: float = 0.0, block_size: int | None = None, storage_dtype: torch.dtype | None = None,
                 grad_scaler=None, distributed: bool | str | Reducer = "auto") -> None:
        validation.non_negative(lr, "lr")
        self.damping = validation.positive_finite(damping, "damping (lambda)")
        self.window = validation.positive_int(window, "window (the number of gradients m)")
        validation.fraction(momentum, "momentum")
        validation.non_negative(weight_decay, "weight_decay")
        self.block_size = validation.optional_positive_int(block_size, "block_size")
        if storage_dtype not in STORAGE:
            raise ValueError(f"storage_dtype must be None, torch.float16, torch.bfloat16, torch.float32 or "
                             f"torch.float64, got {storage_dtype}")
        self.distributed = check_option(distributed)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        for group in self.param_groups[1:]:
            validation.non_negative(group["lr"], "lr")
            validation.fraction(group["momentum"], "momentum")
            validation.non_negative(group["weight_decay"], "weight_decay")
        params = self._params()
        if not params:
            raise ValueError("MFAC got no parameter that requires a gradient")
        if len({p.device for p in params}) != 1 or not all(p.is_floating_point() for p in params):
            raise ValueError("MFAC keeps one flat window of all parameters: they must be floating and on one device")
        dtype = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
        self.operator = MFACOperator(self.window, sum(p.numel() for p in params), self.damping,
                                     block_size=self.block_size, dtype=dtype, storage_dtype=storage_dtype,
                                     device=params[0].device)
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.num_steps = self.num_good_steps = 0
        self._agreed_world: int | None = None

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ---- the step ------------------------------------------------------------------------
    def step(self, closure: Callable | Sequence[Callable] | None = None) -> Tensor:  # type: ignore[override]
        """One step; ``closure()`` returns the mean loss or ``(loss, outputs)`` without calling
        ``backward`` (or a list of closures, one per micro-batch). Returns the mean loss (over all
        ranks' micro-batches, the same on every rank).
        """
        closures = [closure] if callable(closure) else list(closure or [])
        if not closures or not all(callable(c) for c in closures):
            raise ValueError("MFAC computes its own gradient: call step(closure) with closure() returning the loss "
                             "(or (loss, outputs)), without calling backward, or step([closure, ...]) with one "
                             "closure per micro-batch")
        params = self._params()
        if sum(p.numel() for p in params) != self.operator.shape[0]:
            raise ValueError(f"MFAC's window has {self.operator.shape[0]} coordinates, the parameters now "
                             f"{sum(p.numel() for p in params)}: build a new optimizer after changing the model")
        reducer = reducer_for(self.distributed)
        if reducer.distributed:
            self._handshake(reducer, params)
        step = self.num_steps + 1
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        g, mean_loss = self._gradient(closures, params, reducer, step, scale)
        if not math.isfinite(float(mean_loss)):
            raise FloatingPointError(f"the loss at step {step} is {float(mean_loss)}; parameters were not changed")
        if not bool(torch.isfinite(g).all()):
            if self.grad_scaler is not None:  # the scaled gradient overflowed: skip, back off
                self.num_good_steps = rescale(self.grad_scaler, scale, True, self.num_good_steps)
                return mean_loss
            raise FloatingPointError(f"the gradient at step {step} is not finite; the parameters and the "
                                     "M-FAC window were not changed")
        self._apply(params, g)
        self.num_steps = step
        if self.grad_scaler is not None:
            self.num_good_steps = rescale(self.grad_scaler, scale, False, self.num_good_steps)
        return mean_loss

    def _gradient(self, closures: list[Callable], params: list[Tensor], reducer: Reducer, step: int,
                  scale: float) -> tuple[Tensor, Tensor]:
        r"""The sample-weighted mean gradient :math:`\sum n_k g_k / \sum n_k` over the closures
        (and ranks, in one all-reduce), unscaled, in the window's dtype, and the mean loss.
        """
        dtype = self.operator.dtype
        total = torch.zeros(self.operator.shape[0], dtype=dtype, device=self.operator.device)
        loss_sum, count, forms = 0.0, 0.0, set()
        with torch.enable_grad():
            for micro in closures:
                out = micro()
                loss, n = _loss_and_count(out, step)
                forms.add(isinstance(out, (tuple, list)))
                scaled = self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss
                grads = torch.autograd.grad(scaled, params, allow_unused=True)
                total += flat(grads, params).to(dtype) * n
                loss_sum += float(loss.detach()) * n
                count += n
        if len(forms) > 1:
            raise ValueError(f"the closures of step {step} return a bare loss and (loss, outputs) mixed: "
                             "every closure of a step must return the same form (the sample counts weight them)")
        tail = torch.tensor([loss_sum, count, float(len(closures))], dtype=dtype, device=total.device)
        if reducer.distributed:
            total, tail = reducer.sum([total, tail], what="MFAC gradient")
        g = total / (float(tail[1]) * scale) if scale != 1.0 else total / float(tail[1])
        return g, tail[0] / tail[1]

    def _apply(self, params: list[Tensor], g: Tensor) -> None:
        """Weight decay, insertion (which checks before it changes the window), the inverse product,
        momentum and the parameter update, group by group on slices of the flat vectors.
        """
        sizes = [p.numel() for p in params]
        groups = {id(p): group for group in self.param_groups for p in group["params"]}
        if any(groups[id(p)]["weight_decay"] for p in params):
            decay = torch.cat([groups[id(p)]["weight_decay"] * p.detach().reshape(-1).to(g.dtype) for p in params])
            g = g + decay
            if not bool(torch.isfinite(g).all()):
                raise FloatingPointError("the gradient plus weight decay is not finite (are the parameters?); "
                                         "the parameters and the M-FAC window were not changed")
        self.operator.add(g)
        d = self.operator.inverse_product(g)
        with torch.no_grad():
            for p, piece in zip(params, torch.split(d, sizes)):
                group = groups[id(p)]
                direction = piece.view_as(p).to(p.dtype)
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    buf.mul_(group["momentum"]).add_(direction, alpha=1 - group["momentum"])
                    direction = buf
                p.add_(direction, alpha=-group["lr"])

    # ---- data parallelism and checkpoints ------------------------------------------------------
    def _handshake(self, reducer: Reducer, params: list[Tensor]) -> None:
        """Check once per world (and after loading a state) that every rank runs the same optimizer
        with the same window (every rank inserts the same gradients, so a window that differs stays so).
        """
        agree_once(self, reducer, lambda: {
            "optimizer": "MFAC",
            "parameters (shape, dtype)": [(tuple(p.shape), str(p.dtype).removeprefix("torch.")) for p in params],
            "hyperparameters": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "settings": {"window": self.window, "damping": self.damping, "block_size": self.block_size,
                         "storage_dtype": str(self.operator.gradients.dtype)},
            "steps": (self.num_steps, self.num_good_steps, self.operator.num_added),
            "window digest": digest(self.operator.gram),
            "loss scale": float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0,
        })

    def state_dict(self) -> dict:
        """The torch state (momentum buffers) plus ``second_order``: the counters and copies of the window."""
        out = super().state_dict()
        out["second_order"] = {"optimizer": "MFAC", "num_steps": self.num_steps, "num_good_steps": self.num_good_steps,
                               "window": self.operator.state_dict()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state of :meth:`state_dict`, checked first (``ValueError`` before anything changes):
        the writer, the groups, the counters, the window's settings and shapes (the window, its
        Gram matrix and count) and every momentum buffer's shape. A resumed run is bitwise the
        uninterrupted one.
        """
        extra, params = check_groups("MFAC", self.param_groups, state_dict)
        for counter in ("num_steps", "num_good_steps"):
            validation.non_negative_int(extra.get(counter), f"the state_dict's {counter}")
        for key, state in state_dict.get("state", {}).items():
            if key in params and "momentum_buffer" in state:
                where, p = params[key]
                buf = state["momentum_buffer"]
                if not isinstance(buf, Tensor) or buf.shape != p.shape:
                    shape = list(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
                    raise ValueError(f"the momentum buffer of {where} is {shape}, the parameter {list(p.shape)}: "
                                     "the state was saved on another model")
        window = self.operator.checked_state(extra.get("window"))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "second_order"})
        self.operator.restore(window)
        self.num_steps, self.num_good_steps = extra["num_steps"], extra["num_good_steps"]
        self._agreed_world = None


def _loss_and_count(out: Any, step: int) -> tuple[Tensor, float]:
    """The checked loss of a closure's output and its sample count (1 for a bare loss)."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"the MFAC closure at step {step} returned {len(out)} values: return the mean loss, "
                             "or (loss, outputs) with the model's outputs [batch, ...] (or the batch size)")
        loss, outputs = out
        if isinstance(outputs, Tensor) and outputs.ndim >= 1:
            n = outputs.shape[0]
        elif isinstance(outputs, int) and not isinstance(outputs, bool):
            n = outputs
        else:
            raise ValueError(f"the second value the MFAC closure returned at step {step} must be the model's "
                             f"outputs [batch, ...] or the batch size, got {type(outputs).__name__}")
        if n <= 0:
            raise ValueError(f"the MFAC closure at step {step} counts {n} samples: a batch needs at least one")
        return checked_loss(loss, step), float(n)
    return checked_loss(out, step), 1.0
