r"""Sophia (Liu, Li, Hall, Liang, Ma, ICLR 2024): clipped, diagonally preconditioned momentum.

.. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    h_t = \beta_2 h_{t-k} + (1-\beta_2)\hat h_t \ \text{every } k \text{ steps (else } h_t = h_{t-1}),

    \theta \leftarrow \theta(1 - \eta\lambda), \qquad
    \theta \leftarrow \theta - \eta\,\mathrm{clip}\Big(\frac{m_t}{\max(\gamma h_t, \epsilon)}, 1\Big),

(the code parameterisation of the paper's Algorithm 3: ``clip(z, 1) = max(min(z, 1), -1)``, so where
the curvature is non-positive or tiny the step is ``eta * sign(m)``). The diagonal estimate
:math:`\hat h` is refreshed on steps 1, k+1, 2k+1, ... by

* :class:`SophiaH`: Hutchinson, :math:`\hat h = u \odot Hu` with Gaussian :math:`u`;
* :class:`SophiaG`: Gauss-Newton-Bartlett, :math:`\hat h = B\,\hat g \odot \hat g` where
  :math:`\hat g` is the gradient of the mean cross-entropy against labels sampled from the model's
  own softmax and :math:`B` the number of loss terms (positions); unbiased for the Gauss-Newton
  diagonal of softmax cross-entropy.

After every step, ``clip_fraction`` holds the fraction of coordinates whose ratio was clipped
(the paper's tuning signal: its complement, the "win rate", should settle in 0.1-0.5).

Data-parallel (``distributed="auto"``, the default, under torch.distributed with several
processes; see :class:`~secondorder.optim.base.SecondOrderOptimizer`): :math:`g` and the raw
estimate are averaged over the ranks in one bucketed all-reduce. SophiaH's Gaussian :math:`u` is
drawn identically on every rank, so the average of :math:`u \odot H_r u` is :math:`u \odot Hu` of
the concatenated batch. SophiaG averages :math:`\hat g` (not :math:`\hat g^2`) over the ranks and
multiplies by the total number of positions; its labels come from uniforms drawn for all
ranks' positions (each rank uses its slice, after a 2W-integer all-reduce of the counts), so
they are the labels one process would sample for the concatenated batch.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from secondorder.distributed.reducer import Reducer
from secondorder.optim import updates
from secondorder.optim.base import SecondOrderOptimizer, curvature_period, validate_common
from secondorder.optim.estimators import CurvatureEstimator, GaussNewtonBartlett, HutchinsonGaussian


class _Sophia(SecondOrderOptimizer):
    """Shared update, schedule and checkpointing; subclasses choose the estimator of ``h_hat``."""

    def __init__(self, params: Iterable, estimator: CurvatureEstimator, lr: float, betas: tuple[float, float],
                 rho: float, eps: float, weight_decay: float, curvature_every: int, seed: int, grad_scaler,
                 distributed: bool | str | Reducer, k: int | None):
        validate_common(lr, betas, eps, weight_decay)
        if not rho > 0:
            raise ValueError(f"rho (the clipping scale gamma) must be positive, got {rho}")
        every = curvature_period(curvature_every, "k", k, depth=2)
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=weight_decay),
                         estimator=estimator, buffers=("hessian",), curvature_every=every, seed=seed,
                         grad_scaler=grad_scaler, distributed=distributed)

    @property
    def clip_fraction(self) -> float:
        """Fraction of coordinates whose ratio was clipped at the last step (nan before the first).

        Read lazily, so that a step does not wait for the device.
        """
        return float(self.last_count) / self.last_total if self.last_total else float("nan")

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], states: list[dict],
                estimates: list[Tensor] | None) -> Tensor:
        return updates.sophia(params, [s["exp_avg"] for s in states], [s["hessian"] for s in states], estimates,
                              lr=group["lr"], beta2=group["betas"][1], rho=group["rho"], eps=group["eps"],
                              weight_decay=group["weight_decay"])


class SophiaH(_Sophia):
    """Sophia with the Hutchinson estimate ``u * Hu`` (Gaussian ``u``); ``closure()`` returns the loss.

    Defaults follow levanter's Sophia-H (gamma 0.01) and the paper (betas (0.965, 0.99),
    ``curvature_every`` 10, the paper's k); ``k=`` is its deprecated name.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.01, eps: float = 1e-12, weight_decay: float = 0.1, curvature_every: int = 10,
                 seed: int = 0, grad_scaler: torch.amp.GradScaler | None = None,
                 distributed: bool | str | Reducer = "auto", *, k: int | None = None):
        super().__init__(params, HutchinsonGaussian(), lr, betas, rho, eps, weight_decay, curvature_every, seed,
                         grad_scaler, distributed, k)


class SophiaG(_Sophia):
    """Sophia with the Gauss-Newton-Bartlett estimate, for softmax cross-entropy models.

    ``closure()`` returns ``(loss, logits)``: the training loss and the logits ``[..., C]`` it was
    computed from (class scores on the last dimension). On refresh steps labels are sampled from
    ``softmax(logits)`` with the optimizer's own generator and ``h_hat = B * g_hat**2``, B the
    number of sampled positions. Defaults follow the official Sophia-G (rho 0.04, betas
    (0.965, 0.99), weight decay 0.1, ``curvature_every`` 10, the paper's k; ``k=`` is its
    deprecated name); the repo's ``rho * bs * h`` is ``rho * h`` here because ``B`` is inside ``h_hat``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, eps: float = 1e-12, weight_decay: float = 0.1, curvature_every: int = 10,
                 seed: int = 0, grad_scaler: torch.amp.GradScaler | None = None,
                 distributed: bool | str | Reducer = "auto", *, k: int | None = None):
        super().__init__(params, GaussNewtonBartlett(), lr, betas, rho, eps, weight_decay, curvature_every, seed,
                         grad_scaler, distributed, k)
