r"""Curvature estimators: what an optimizer's refresh step measures, kept apart from its update rule.

An estimator turns one micro-batch's closure output into an :class:`Estimate`: the gradient and
*raw* curvature quantities that are **summable**: the optimizer core averages them over the
micro-batches and ranks (with the same probes on each, drawn from the step's generator) and
only then calls :meth:`CurvatureEstimator.combine`, so accumulation and data parallelism give
the full-batch estimate. A scalar ``weight`` (e.g. the number of positions) is summed, not averaged.

* :class:`HutchinsonRademacher` (Hutchinson 1989; AdaHessian, Yao et al. 2021):
  :math:`z \odot Hz` with Rademacher :math:`z`; ``absolute=True`` gives AdaHessian's official
  :math:`|z \odot Hz|`, the absolute value taken after averaging over micro-batches.
* :class:`HutchinsonGaussian` (Sophia-H, Liu et al. 2024): :math:`u \odot Hu`, :math:`u \sim N(0, I)`.
* :class:`GaussNewtonBartlett` (Sophia-G): :math:`B\,\hat g \odot \hat g`, :math:`\hat g` the gradient
  of the mean cross-entropy against labels sampled from the model's softmax and :math:`B` the
  number of sampled positions; unbiased for the Gauss-Newton diagonal of softmax cross-entropy.

K-FAC factors, M-FAC gradient windows and sub-sampled Hessians implement the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from secondorder.distributed.reducer import Reducer
from secondorder.operators.products import hessian_product

__all__ = [
    "CurvatureEstimator", "Estimate", "GaussNewtonBartlett", "HutchinsonGaussian", "HutchinsonRademacher",
    "StepContext",
]


@dataclass(frozen=True)
class StepContext:
    """What one optimizer step knows, passed explicitly instead of kept on the optimizer.

    ``step`` is the 1-based number of the step in progress, ``refresh`` whether it estimates
    curvature, ``num_closures`` this rank's micro-batches, ``loss_scale`` the GradScaler's scale
    (1 without one), ``reducer`` how sums travel over ranks and ``generator`` the probe source.
    """

    step: int
    refresh: bool
    num_closures: int
    loss_scale: float
    reducer: Reducer
    generator: torch.Generator

    def shared_draws(self, count: int, device: torch.device, what: str) -> tuple[int, int]:
        """``(offset, total)``: where this rank's ``count`` random draws lie among all ranks' draws
        (in rank order) for the micro-batch in progress; ``(0, count)`` in one process.

        Every rank draws ``total`` numbers from its (identical) generator and uses its slice, so
        the draws are those of one process on the concatenated micro-batch. Also checks that
        the ranks pass equal numbers of closures.
        """
        if not self.reducer.distributed:
            return 0, count
        everyone = self.reducer.counts(count, self.num_closures, device=device, what=what)
        check_same_closures([c[1] for c in everyone], self.step)
        counts = [c[0] for c in everyone]
        return sum(counts[: self.reducer.rank]), sum(counts)


def check_same_closures(counts: list[int], step: int) -> None:
    """Every rank must accumulate the same number of micro-batches."""
    if any(c != counts[0] for c in counts):
        raise ValueError(
            f"the ranks passed different numbers of closures to step {step}: "
            + ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
            + "; every rank must accumulate the same number of micro-batches"
        )


@dataclass(frozen=True)
class Estimate:
    """One micro-batch's derivatives: the gradient (``None`` where the loss does not depend on a
    parameter), raw curvature per parameter (summable), and a summed scalar ``weight``.
    """

    gradient: tuple
    curvature: list
    weight: Tensor | None = None


class CurvatureEstimator:
    """The interface: how to read the closure's output, estimate, unscale and combine."""

    same_probes_per_micro_batch = True
    """Whether every micro-batch of a step reuses the step's probes (Hutchinson) or draws its own."""

    def loss_of(self, out: object) -> object:
        """The loss in what the closure returned."""
        return out

    def with_loss(self, out: object, loss: Tensor) -> object:
        """The closure's output with its loss replaced (by the scaled loss)."""
        return loss

    def estimate(self, out: Any, params: list[Tensor], ctx: StepContext) -> Estimate:
        """Gradient and raw curvature of one micro-batch."""
        raise NotImplementedError

    def unscale(self, raw: list, scale: float) -> list:
        """Raw quantities of the scaled loss brought back to the loss's scale."""
        return [None if v is None else v * (1.0 / scale) for v in raw]

    def combine(self, raw: list, weight: Tensor | None) -> list[Tensor]:
        """Per-parameter estimates from the raw quantities averaged over all micro-batches."""
        return raw

    def settings(self) -> dict:
        """What every rank must share (for the data-parallel handshake)."""
        return {"estimator": type(self).__name__}


class HutchinsonRademacher(CurvatureEstimator):
    """``num_probes`` Rademacher probes: raw ``z * Hz`` ``[num_probes, *shape]``; combined to the
    probe mean of ``|z * Hz|`` (``absolute``) or of ``z * Hz``.

    Probes are drawn per parameter in order, as the official AdaHessian code draws them (its
    ``2 * randint_like(p, high=2) - 1``), on the parameters' device.
    """

    def __init__(self, num_probes: int = 1, absolute: bool = True):
        self.num_probes, self.absolute = num_probes, absolute

    def probes(self, params: list[Tensor], gen: torch.Generator) -> Tensor:
        return torch.cat([
            (2 * torch.randint(0, 2, (self.num_probes, *p.shape), generator=gen, dtype=p.dtype,
                               device=gen.device) - 1).reshape(self.num_probes, -1) for p in params
        ], dim=1).to(params[0].device)

    def estimate(self, out: Any, params: list[Tensor], ctx: StepContext) -> Estimate:
        raw = [torch.zeros(self.num_probes, *p.shape, dtype=p.dtype, device=p.device) for p in params]

        def sink(start: int, pieces: list[Tensor], products: tuple) -> None:
            for r, piece, product in zip(raw, pieces, products):
                if product is not None:
                    r[start : start + piece.shape[0]] = piece * product

        return Estimate(hessian_product(out, params, self.probes(params, ctx.generator), sink), raw)

    def combine(self, raw, weight):
        transform = torch.abs if self.absolute else (lambda x: x)
        return [transform(r).mean(0) for r in raw]

    def settings(self) -> dict:
        return {**super().settings(), "num_probes": self.num_probes, "absolute": self.absolute}


class HutchinsonGaussian(CurvatureEstimator):
    """One Gaussian probe ``u`` over all parameters: raw ``u * Hu`` per parameter."""

    def estimate(self, out: Any, params: list[Tensor], ctx: StepContext) -> Estimate:
        P = sum(p.numel() for p in params)
        u = torch.randn(1, P, generator=ctx.generator, dtype=params[0].dtype,
                        device=ctx.generator.device).to(params[0].device)
        estimates: list = [None] * len(params)

        def sink(start: int, pieces: list[Tensor], products: tuple) -> None:
            for i, (piece, product) in enumerate(zip(pieces, products)):
                if product is not None:  # None (no curvature) becomes zeros below
                    estimates[i] = (piece * product)[0]

        grads = hessian_product(out, params, u, sink)
        return Estimate(grads, [e if e is not None else torch.zeros_like(p) for e, p in zip(estimates, params)])


class GaussNewtonBartlett(CurvatureEstimator):
    """Sampled-label gradients: raw ``g_hat`` per parameter, weight the number of positions ``B``;
    combined to ``B * g_hat**2`` with ``g_hat`` averaged over micro-batches (and ranks).

    The closure returns ``(loss, logits)`` (classes on the last dimension). Labels come by
    inverse-CDF sampling, one uniform per position, so micro-batches and ranks (each using its
    slice of the draws for all ranks' positions) draw what the full batch would.
    """

    same_probes_per_micro_batch = False  # every micro-batch samples its own labels

    def loss_of(self, out: object) -> object:
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Tensor)):
            raise ValueError("SophiaG's closure must return (loss, logits); logits carry the classes on the last dim")
        return out[0]

    def with_loss(self, out: object, loss: Tensor) -> object:
        return (loss, out[1])  # type: ignore[index]

    def unscale(self, raw: list, scale: float) -> list:
        return [g / scale for g in raw]

    def estimate(self, out: Any, params: list[Tensor], ctx: StepContext) -> Estimate:
        loss = out[0]
        logits = out[1].reshape(-1, out[1].shape[-1])
        cdf = torch.softmax(logits.detach().double(), dim=-1).cpu().cumsum(-1)
        offset, total = ctx.shared_draws(cdf.shape[0], logits.device, "SophiaG sample counts")
        uniform = torch.rand(total, 1, generator=ctx.generator, dtype=torch.float64,
                             device=ctx.generator.device)[offset : offset + cdf.shape[0]].cpu()
        uniform = uniform * cdf[:, -1:]
        sampled = torch.searchsorted(cdf, uniform).squeeze(1).clamp_max(cdf.shape[1] - 1).to(logits.device)
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        sampled_loss = F.cross_entropy(logits, sampled) * ctx.loss_scale  # scaled like the loss
        g_hat = torch.autograd.grad(sampled_loss, params, allow_unused=True)
        positions = torch.tensor(float(logits.shape[0]), dtype=loss.dtype, device=loss.device)
        return Estimate(grads, [g if g is not None else torch.zeros_like(p) for g, p in zip(g_hat, params)],
                        positions)

    def combine(self, raw, weight):
        return [weight * g * g for g in raw]
