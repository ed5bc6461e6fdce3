r"""The optimizers' update rules as plain functions over lists of tensors (the style of
``torch/optim/adam.py``): no optimizer object, every state buffer and hyperparameter an argument,
``foreach`` kernels over a parameter group. The optimizers in :mod:`secondorder.optim` call them
after the core has checked every input, so they may update in place.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adahessian", "momentum", "sophia", "spatial_average"]


def momentum(exp_avgs: list[Tensor], grads: list[Tensor], beta1: float) -> None:
    r""":math:`m \leftarrow \beta_1 m + (1-\beta_1) g` in place."""
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)


def spatial_average(d: Tensor, block_size: int | None) -> Tensor:
    """Average ``d`` (shaped like its parameter) over AdaHessian's blocks and broadcast back:
    kernels over their spatial extent, 2-D weights over contiguous ``block_size`` columns.
    """
    if d.ndim >= 3:
        return d.mean(dim=tuple(range(2, d.ndim)), keepdim=True).expand_as(d)
    if d.ndim == 2 and block_size:
        rows, cols = d.shape
        return d.reshape(rows, cols // block_size, block_size).mean(-1, keepdim=True).expand(
            rows, cols // block_size, block_size
        ).reshape(rows, cols)
    return d


def adahessian(
    params: list[Tensor], exp_avgs: list[Tensor], exp_hessian_diag_sqs: list[Tensor],
    estimates: list[Tensor] | None, *, steps: list[int], curvature_steps: list[int], lr: float,
    beta2: float, beta1: float, eps: float, weight_decay: float, hessian_power: float, block_size: int | None,
) -> None:
    r"""AdaHessian's update after the momentum (see :class:`~secondorder.optim.AdaHessian`):
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) \bar D^2` on refresh steps (``estimates`` given),
    then :math:`\theta \leftarrow \theta - \eta\big(\hat m / (\sqrt{\hat v}^{\,k} + \epsilon) + \lambda\theta\big)`,
    with the bias corrections of each parameter's own step and curvature-step counts.

    The official code's order of operations, so that it is matched bit for bit:
    ``p -= lr * (m / bias1 / (sqrt(v)**k / sqrt(bias2)**k + eps) + wd * p)``.
    """
    if estimates is not None:
        d = [spatial_average(e, block_size) for e in estimates]
        torch._foreach_mul_(exp_hessian_diag_sqs, beta2)
        torch._foreach_addcmul_(exp_hessian_diag_sqs, d, d, value=1 - beta2)
    k = hessian_power
    denom = torch._foreach_sqrt(exp_hessian_diag_sqs)
    if k != 1:
        torch._foreach_pow_(denom, k)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** max(s, 1)) ** k for s in curvature_steps])
    torch._foreach_add_(denom, eps)
    step = torch._foreach_div(exp_avgs, [1 - beta1**s for s in steps])
    torch._foreach_div_(step, denom)
    if weight_decay:
        torch._foreach_add_(step, torch._foreach_mul(params, weight_decay))
    torch._foreach_mul_(step, lr)
    torch._foreach_sub_(params, step)


def sophia(
    params: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor], estimates: list[Tensor] | None, *,
    lr: float, beta2: float, rho: float, eps: float, weight_decay: float,
) -> Tensor:
    r"""Sophia's update after the momentum (see :mod:`secondorder.optim.sophia`):
    :math:`h \leftarrow \beta_2 h + (1-\beta_2)\hat h` on refresh steps, decoupled weight decay,
    then :math:`\theta \leftarrow \theta - \eta\,\mathrm{clip}(m / \max(\gamma h, \epsilon), 1)`.

    Returns the number of clipped coordinates (a 0-d tensor, read lazily).
    """
    if estimates is not None:
        torch._foreach_mul_(hessians, beta2)
        torch._foreach_add_(hessians, estimates, alpha=1 - beta2)
    denom = torch._foreach_mul(hessians, rho)
    torch._foreach_clamp_min_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    clipped = torch.cat([r.flatten() for r in ratio]).abs().ge(1).sum()
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_clamp_min_(ratio, -1.0)
    torch._foreach_clamp_max_(ratio, 1.0)
    torch._foreach_add_(params, ratio, alpha=-lr)
    return clipped
