r"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, AAAI 2021) as a drop-in optimizer.

Adam's first moment, preconditioned by a running RMS of a Hutchinson estimate of the Hessian
diagonal:

.. math::

    D_t = \mathrm{avg}_\text{block}\big(|z \odot Hz|\big),\quad z \sim \text{Rademacher}, \qquad
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) D_t^2,

    \theta_{t+1} = \theta_t - \eta\Big(\frac{m_t / (1-\beta_1^t)}
        {\big(\sqrt{v_t / (1-\beta_2^{s_t})}\big)^k + \epsilon} + \lambda\theta_t\Big),

with Hessian power :math:`k`, decoupled weight decay :math:`\lambda`, and :math:`s_t` the number
of curvature updates so far: with ``update_each = n > 1`` the curvature (and :math:`v`) is
refreshed every n-th step only, and the bias correction counts those refreshes, so the
steady-state denominator equals the every-step one (pytorch-optimizer's ``update_period``
uses the step count and under-estimates it by about :math:`1/\sqrt n`).

Estimators (``estimator=``):

* ``"official"`` (default): :math:`|z \odot Hz|`, as every official implementation. With
  Rademacher :math:`z` this is :math:`|Hz|`, whose mean square is :math:`(H^2)_{ii}`: the
  denominator tracks the row norms :math:`\|H_{i,:}\|_2`, not :math:`|H_{ii}|`.
* ``"diagonal"``: the signed :math:`z \odot Hz`, an unbiased estimate of :math:`\mathrm{diag}(H)`
  (block-averaged); its square enters the EMA.

Spatial averaging (``D`` is averaged over blocks of coordinates and broadcast back):

* 1-D parameters (biases, norm scales): no averaging;
* 2-D parameters (``Linear`` weights ``[out, in]``): contiguous blocks of ``block_size`` along
  ``in`` (the paper's attention figure); ``None`` (default) for no averaging;
* parameters with 3 or more dimensions (convolution kernels ``[out, in, *kernel]`` of any
  dimension): the mean over the kernel's spatial extent, e.g. 9 entries of a 3x3 kernel.

Usage: the closure returns the loss and **does not** call ``backward``; the optimizer computes
the gradient and, on curvature steps only, the Hessian-vector products itself::

    opt = AdaHessian(model.parameters())
    loss = opt.step(lambda: loss_fn(model(x), y))
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from secondorder.operators.products import hessian_product
from secondorder.optim.base import SecondOrderOptimizer, gradient_only, validate_common


def spatial_average(d: Tensor, block_size: int | None) -> Tensor:
    """Average ``d`` (shaped like its parameter) over AdaHessian's blocks and broadcast back."""
    if d.ndim >= 3:
        return d.mean(dim=tuple(range(2, d.ndim)), keepdim=True).expand_as(d)
    if d.ndim == 2 and block_size:
        rows, cols = d.shape
        return d.reshape(rows, cols // block_size, block_size).mean(-1, keepdim=True).expand(
            rows, cols // block_size, block_size
        ).reshape(rows, cols)
    return d


class AdaHessian(SecondOrderOptimizer):
    """AdaHessian; see the module docstring for the update, estimators and spatial averaging.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (0.15, the paper's CIFAR setting).
        betas: EMA coefficients of the gradient and of the squared curvature.
        eps: added to the denominator (1e-4 as the official code).
        weight_decay: decoupled weight decay, applied as ``lr * weight_decay * theta``.
        hessian_power: ``k`` in [0, 1]; 0 gives momentum SGD with Adam's bias correction.
        update_each: refresh the curvature every this many steps (1 = every step).
        estimator: ``"official"`` (``|z * Hz|``) or ``"diagonal"`` (``z * Hz``).
        block_size: spatial averaging block for 2-D parameters (must divide their last dimension).
        num_probes: Rademacher probes per curvature step (averaged).
        seed: seed of the optimizer's own probe generator (the global RNG is never used).
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast: the loss is scaled before
            differentiating and the gradient and curvature are unscaled before use (no scale leaks
            into the denominator); an overflow skips the step and backs the scale off.
        distributed: ``"auto"`` averages gradient and ``z * Hz`` over the ranks whenever
            torch.distributed runs more than one process (every rank draws the same ``z``);
            ``True`` requires that, ``False`` never communicates. See
            :class:`~secondorder.optim.base.SecondOrderOptimizer`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        estimator: str = "official",
        block_size: int | None = None,
        num_probes: int = 1,
        seed: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,
        distributed: bool | str = "auto",
    ):
        validate_common(lr, betas, eps, weight_decay)
        if not 0.0 <= hessian_power <= 1.0:
            raise ValueError(f"hessian_power must lie in [0, 1], got {hessian_power}")
        if not isinstance(update_each, int) or update_each < 1:
            raise ValueError(f"update_each must be a positive integer, got {update_each!r}")
        if estimator not in ("official", "diagonal"):
            raise ValueError(f"estimator must be 'official' or 'diagonal', got {estimator!r}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
        if not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
                        block_size=block_size)
        super().__init__(params, defaults, update_each, seed, grad_scaler, distributed)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim == 2 and group["block_size"] and p.shape[1] % group["block_size"]:
                    raise ValueError(
                        f"block_size {group['block_size']} does not divide the last dimension of a parameter of "
                        f"shape {list(p.shape)}; choose a divisor or put that parameter in a group with block_size=None"
                    )
        self.estimator, self.num_probes = estimator, num_probes

    def _settings(self) -> dict:
        return {**super()._settings(), "estimator": self.estimator, "num_probes": self.num_probes}

    # ---- curvature --------------------------------------------------------------------
    def _curvature(self, loss: Tensor, params: list[Tensor]) -> tuple[tuple, list[Tensor]]:
        """Gradient and, per parameter, the signed products ``z * Hz`` of every probe ``[num_probes, *shape]``."""
        # per parameter, in order, as the official code draws them (its 2 * randint_like(p, high=2) - 1)
        probes = torch.cat([
            (2 * torch.randint(0, 2, (self.num_probes, *p.shape), generator=self.generator, dtype=p.dtype) - 1)
            .reshape(self.num_probes, -1) for p in params
        ], dim=1).to(params[0].device)
        raw = [torch.zeros(self.num_probes, *p.shape, dtype=p.dtype, device=p.device) for p in params]

        def sink(start: int, pieces: list[Tensor], products: tuple) -> None:
            for r, piece, product in zip(raw, pieces, products):
                if product is not None:
                    r[start : start + piece.shape[0]] = piece * product

        gradient = hessian_product(loss, params, probes, sink)
        return gradient, raw

    def _combine(self, raw: list, count: int) -> list:
        """``|z * Hz|`` (official) or ``z * Hz`` (diagonal), averaged over the probes.

        The absolute value is taken after averaging over micro-batches, so accumulation gives
        the full-batch estimate.
        """
        transform = torch.abs if self.estimator == "official" else (lambda x: x)
        return [transform(r).mean(0) for r in raw]

    def _derivatives(self, out, params, step, refresh):
        loss = out
        if refresh:
            return (loss, *self._curvature(loss, params))
        return gradient_only(loss, params)

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], estimates: list[Tensor] | None) -> int:
        beta1, beta2 = group["betas"]
        states = self._momentum(params, grads, beta1, "exp_hessian_diag_sq")
        second = [state["exp_hessian_diag_sq"] for state in states]
        if estimates is not None:
            d = [spatial_average(e, group["block_size"]) for e in estimates]
            torch._foreach_mul_(second, beta2)
            torch._foreach_addcmul_(second, d, d, value=1 - beta2)
        bias1 = 1 - beta1**self.num_steps
        bias2 = 1 - beta2 ** max(self.num_curvature_steps, 1)
        k = group["hessian_power"]
        # the official code's order of operations, so that it is matched bit for bit:
        # p -= lr * (m / bias1 / (sqrt(v)**k / sqrt(bias2)**k + eps) + wd * p)
        denom = torch._foreach_sqrt(second)
        if k != 1:
            torch._foreach_pow_(denom, k)
        torch._foreach_div_(denom, math.sqrt(bias2) ** k)
        torch._foreach_add_(denom, group["eps"])
        step = torch._foreach_div([state["exp_avg"] for state in states], bias1)
        torch._foreach_div_(step, denom)
        if group["weight_decay"]:
            torch._foreach_add_(step, torch._foreach_mul(params, group["weight_decay"]))
        torch._foreach_mul_(step, group["lr"])
        torch._foreach_sub_(params, step)
        return 0
