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
import torch.nn.functional as F
from torch import Tensor

from secondorder.operators.products import hessian_product
from secondorder.optim.base import SecondOrderOptimizer, gradient_only, validate_common


class _Sophia(SecondOrderOptimizer):
    """Shared update, schedule and checkpointing; subclasses provide the estimate ``h_hat``."""

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float], rho: float, eps: float,
                 weight_decay: float, k: int, seed: int, grad_scaler=None, distributed: bool | str = "auto"):
        validate_common(lr, betas, eps, weight_decay)
        if not rho > 0:
            raise ValueError(f"rho (the clipping scale gamma) must be positive, got {rho}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k (steps between curvature refreshes) must be a positive integer, got {k!r}")
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, eps=eps, weight_decay=weight_decay), k, seed,
                         grad_scaler, distributed)
        self._clipped: Tensor | int = 0
        self._coordinates = 0

    @property
    def clip_fraction(self) -> float:
        """Fraction of coordinates whose ratio was clipped at the last step (nan before the first).

        Read lazily, so that a step does not wait for the device.
        """
        return float(self._clipped) / self._coordinates if self._coordinates else float("nan")

    def _estimate(self, out: object, params: list[Tensor], step: int) -> tuple[Tensor, tuple, list]:
        raise NotImplementedError

    def _derivatives(self, out, params, step, refresh):
        if refresh:
            return self._estimate(out, params, step)
        return gradient_only(self._loss_of(out), params)

    def _finish(self, counted, total: int) -> None:
        self._clipped, self._coordinates = counted, total

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor], estimates: list[Tensor] | None):
        beta1, beta2 = group["betas"]
        states = self._momentum(params, grads, beta1, "hessian")
        hessians = [state["hessian"] for state in states]
        if estimates is not None:
            torch._foreach_mul_(hessians, beta2)
            torch._foreach_add_(hessians, estimates, alpha=1 - beta2)
        denom = torch._foreach_mul(hessians, group["rho"])
        torch._foreach_clamp_min_(denom, group["eps"])
        ratio = torch._foreach_div([state["exp_avg"] for state in states], denom)
        clipped = torch.cat([r.flatten() for r in ratio]).abs().ge(1).sum()
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(params, ratio, alpha=-group["lr"])
        return clipped


class SophiaH(_Sophia):
    """Sophia with the Hutchinson estimate ``u * Hu`` (Gaussian ``u``); ``closure()`` returns the loss.

    Defaults follow levanter's Sophia-H (gamma 0.01) and the paper (betas (0.965, 0.99), k 10).
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.01, eps: float = 1e-12, weight_decay: float = 0.1, k: int = 10, seed: int = 0,
                 grad_scaler: torch.amp.GradScaler | None = None, distributed: bool | str = "auto"):
        super().__init__(params, lr, betas, rho, eps, weight_decay, k, seed, grad_scaler, distributed)

    def _estimate(self, out, params, step):
        loss = out
        P = sum(p.numel() for p in params)
        u = torch.randn(1, P, generator=self.generator, dtype=params[0].dtype).to(params[0].device)
        estimates = [None] * len(params)

        def sink(start: int, pieces: list[Tensor], products: tuple) -> None:
            for i, (piece, product) in enumerate(zip(pieces, products)):
                if product is not None:  # None (no curvature) becomes zeros below
                    estimates[i] = (piece * product)[0]

        grads = hessian_product(loss, params, u, sink)
        return loss, grads, [e if e is not None else torch.zeros_like(p) for e, p in zip(estimates, params)]


class SophiaG(_Sophia):
    """Sophia with the Gauss-Newton-Bartlett estimate, for softmax cross-entropy models.

    ``closure()`` returns ``(loss, logits)``: the training loss and the logits ``[..., C]`` it was
    computed from (class scores on the last dimension). On refresh steps labels are sampled from
    ``softmax(logits)`` with the optimizer's own generator and ``h_hat = B * g_hat**2``, B the
    number of sampled positions. Defaults follow the official Sophia-G (rho 0.04, betas
    (0.965, 0.99), weight decay 0.1, k 10); the repo's ``rho * bs * h`` is ``rho * h`` here
    because ``B`` is inside ``h_hat``.
    """

    same_probes_per_micro_batch = False  # every micro-batch samples its own labels

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, eps: float = 1e-12, weight_decay: float = 0.1, k: int = 10, seed: int = 0,
                 grad_scaler: torch.amp.GradScaler | None = None, distributed: bool | str = "auto"):
        super().__init__(params, lr, betas, rho, eps, weight_decay, k, seed, grad_scaler, distributed)

    def _loss_of(self, out: object) -> object:
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Tensor)):
            raise ValueError("SophiaG's closure must return (loss, logits); logits carry the classes on the last dim")
        return out[0]

    def _with_loss(self, out: object, loss: Tensor) -> object:
        return (loss, out[1])

    def _unscale(self, raw: list, scale: float) -> list:
        return [g / scale for g in raw[:-1]] + [raw[-1]]  # the last entry counts positions

    def _estimate(self, out, params, step):
        loss = out[0]
        logits = out[1].reshape(-1, out[1].shape[-1])
        # inverse-CDF sampling: one uniform per position, so micro-batches (and ranks: each uses its
        # slice of the draws for all ranks' positions) draw what the full batch would
        cdf = torch.softmax(logits.detach().double(), dim=-1).cpu().cumsum(-1)
        offset, total = self._shared_draws(cdf.shape[0], logits.device)
        uniform = torch.rand(total, 1, generator=self.generator, dtype=torch.float64)[offset : offset + cdf.shape[0]]
        uniform = uniform * cdf[:, -1:]
        sampled = torch.searchsorted(cdf, uniform).squeeze(1).clamp_max(cdf.shape[1] - 1).to(logits.device)
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        sampled_loss = F.cross_entropy(logits, sampled) * self.loss_scale  # scaled like the loss
        g_hat = torch.autograd.grad(sampled_loss, params, allow_unused=True)
        positions = torch.tensor(float(logits.shape[0]), dtype=loss.dtype, device=loss.device)
        return loss, grads, [g if g is not None else torch.zeros_like(p) for g, p in zip(g_hat, params)] + [positions]

    def _combine(self, raw: list, count: int) -> list:
        """``B * g_hat**2`` with ``g_hat`` averaged over micro-batches and ``B`` their total positions."""
        positions = raw[-1] * count
        return [positions * g * g for g in raw[:-1]]
