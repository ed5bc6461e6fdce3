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
of curvature updates of the parameter so far: with ``curvature_every = n > 1`` the curvature (and :math:`v`) is
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

from typing import Iterable

import torch
from torch import Tensor

from secondorder import validation
from secondorder.distributed.reducer import Reducer
from secondorder.optim import updates
from secondorder.optim.base import SecondOrderOptimizer, curvature_period, validate_common
from secondorder.optim.estimators import HutchinsonRademacher


class AdaHessian(SecondOrderOptimizer):
    """AdaHessian; see the module docstring for the update, estimators and spatial averaging.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (0.15, the paper's CIFAR setting).
        betas: EMA coefficients of the gradient and of the squared curvature.
        eps: added to the denominator (1e-4 as the official code); must be positive.
        weight_decay: decoupled weight decay, applied as ``lr * weight_decay * theta``.
        hessian_power: ``k`` in [0, 1]; 0 gives momentum SGD with Adam's bias correction.
        curvature_every: refresh the curvature every this many steps (1 = every step).
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
        update_each: deprecated name of ``curvature_every``.

    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        curvature_every: int = 1,
        estimator: str = "official",
        block_size: int | None = None,
        num_probes: int = 1,
        seed: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,
        distributed: bool | str | Reducer = "auto",
        *,
        update_each: int | None = None,
    ):
        validate_common(lr, betas, eps, weight_decay)
        if not 0.0 <= hessian_power <= 1.0:
            raise ValueError(f"hessian_power must lie in [0, 1], got {hessian_power}")
        every = curvature_period(curvature_every, "update_each", update_each)
        validation.one_of(estimator, "estimator", ("official", "diagonal"))
        validation.optional_positive_int(block_size, "block_size")
        validation.positive_int(num_probes, "num_probes")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
                        block_size=block_size)
        super().__init__(params, defaults, estimator=HutchinsonRademacher(num_probes, estimator == "official"),
                         buffers=("exp_hessian_diag_sq",), curvature_every=every, seed=seed,
                         grad_scaler=grad_scaler, distributed=distributed)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim == 2 and group["block_size"] and p.shape[1] % group["block_size"]:
                    raise ValueError(
                        f"block_size {group['block_size']} does not divide the last dimension of a parameter of "
                        f"shape {list(p.shape)}; choose a divisor or put that parameter in a group with block_size=None"
                    )

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict],
                estimates: list[Tensor] | None) -> int:
        beta1, beta2 = group["betas"]
        updates.adahessian(
            params, [s["exp_avg"] for s in states], [s["exp_hessian_diag_sq"] for s in states], estimates,
            steps=[s["step"] for s in states], curvature_steps=[s["curvature_step"] for s in states],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            hessian_power=group["hessian_power"], block_size=group["block_size"])
        return 0
