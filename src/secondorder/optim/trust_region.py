r"""Sub-sampled trust region and adaptive cubic regularization (Xu, Roosta & Mahoney 2020).

Each outer iteration takes the full loss :math:`f_0` and gradient :math:`g` and the Hessian
:math:`H_S` of a uniform sample (:mod:`secondorder.optim.subsampled`), then solves a sub-problem
and tests the trial point :math:`x + s` by the ratio of actual to predicted decrease
:math:`\rho = (f_0 - F(x+s)) / (m(0) - m(s))`, with the authors' rules (their code's defaults:
:math:`\eta_1 = 0.8`, :math:`\eta_2 = 10^{-4}`, :math:`\gamma_1 = 2`, :math:`\gamma_2 = 1.2`):

* :class:`TrustRegion`: :math:`\min g^\top s + \frac12 s^\top H_S s`, :math:`\|s\| \le \Delta`, by
  CG-Steihaug (:func:`~secondorder.linalg.steihaug`), the first trial from a random vector of norm
  :math:`0.99\Delta` (``random_start``), a retry from the rejected step rescaled to the new radius.
  :math:`\rho < \eta_2` (or a non-finite loss): reject, :math:`\Delta \leftarrow \Delta/\gamma_1`;
  :math:`\rho < \eta_1`: accept, :math:`\Delta \leftarrow \gamma_2\Delta`; otherwise accept,
  :math:`\Delta \leftarrow \gamma_1\Delta` (both successes enlarge the radius, as in the code),
  capped by ``max_radius``.
* :class:`CubicRegularization` (ARC, Cartis, Gould & Toint 2011): :math:`\min g^\top s +
  \frac12 s^\top H_S s + \frac\sigma3\|s\|^3` by Lanczos (:func:`~secondorder.linalg.cubic`, the
  start perturbed by ``lanczos_noise``). Reject: :math:`\sigma \leftarrow \gamma_1\sigma`;
  :math:`\rho < \eta_1`: :math:`\sigma \leftarrow \max(\sigma_{\min}, \sigma/\gamma_2)`;
  otherwise :math:`\sigma \leftarrow \max(\sigma_{\min}, \sigma/\gamma_1)`. The code's round-off
  guard: when the actual decrease is zero and the predicted one below rounding of :math:`f_0`,
  the step is taken as converged rather than rejected (without it :math:`\sigma` explodes near a
  minimum).

A library cannot loop forever: after ``max_rejections`` consecutive rejections, or once
:math:`\Delta` reaches ``min_radius`` (:math:`\sigma` reaches ``max_sigma``), the iteration ends
without a step (``last_step.accepted`` is False) and the next one draws a new sample. A
sub-problem that predicts no decrease ends the iteration likewise.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from secondorder import validation
from secondorder.distributed.reducer import Reducer
from secondorder.linalg.results import SubproblemResult
from secondorder.linalg.subproblems import cubic, steihaug
from secondorder.optim.subsampled import NewtonStep, SampledCurvature, SubsampledNewton


def _check_rules(eta1: float, eta2: float, gamma1: float, gamma2: float, max_rejections: int) -> None:
    if not 0 < eta2 <= eta1 < 1:
        raise ValueError(f"the acceptance thresholds need 0 < eta2 <= eta1 < 1, got eta1={eta1}, eta2={eta2}")
    if not (gamma1 > 1 and gamma2 >= 1 and math.isfinite(gamma1) and math.isfinite(gamma2)):
        raise ValueError(f"the update factors need gamma1 > 1 and gamma2 >= 1, got gamma1={gamma1}, gamma2={gamma2}")
    validation.positive_int(max_rejections, "max_rejections")


class _RatioTest(SubsampledNewton):
    """Trial steps accepted by the ratio test (the logic TrustRegion and ARC share)."""

    parameter = ""  # "radius" or "sigma": the method's state between steps

    def _solve(self, H: SampledCurvature, grad: Tensor, previous: SubproblemResult | None) -> SubproblemResult:
        raise NotImplementedError

    def _update(self, ratio: float) -> bool:
        """Update the parameter after a trial of ``ratio``; False when no further trial may follow a rejection."""
        raise NotImplementedError

    def _iterate(self, closure: Callable, params: list[Tensor], loss: float, grad: Tensor, H: SampledCurvature,
                 reducer: Reducer) -> NewtonStep:
        group = self.param_groups[0]
        trials, iterations, result, ratio, new_loss = 0, 0, None, math.nan, loss
        accepted = False
        while trials <= group["max_rejections"]:
            result = self._solve(H, grad, result)
            trials, iterations = trials + 1, iterations + result.iterations
            if not result.model_decrease > 0:
                break  # no predicted decrease: a new sample next iteration
            new_loss = self._try(closure, params, result.step, reducer)
            actual = loss - new_loss
            ratio = actual / result.model_decrease if math.isfinite(new_loss) else math.nan
            if actual == 0 and result.model_decrease <= 4 * torch.finfo(grad.dtype).eps * max(abs(loss), 1.0):
                accepted = True  # the round-off guard: converged to rounding
                break
            if ratio >= group["eta2"]:
                accepted = True
                self._update(ratio)
                break
            self._place(params)
            new_loss = loss
            if not self._update(ratio):
                break
        assert result is not None, "at least one trial"
        parameters = {"radius": None, "sigma": None, "step_size": None, self.parameter: self._value()}
        return self._record(H, loss=loss, new_loss=new_loss if accepted else loss, accepted=accepted, trials=trials,
                            ratio=ratio if math.isfinite(ratio) else None, step_norm=float(result.step.norm()) if accepted else 0.0, exit=result.exit,
                            subproblem_iterations=iterations, **parameters)

    def _value(self) -> float:
        raise NotImplementedError


class TrustRegion(_RatioTest):
    r"""Sub-sampled trust-region Newton with CG-Steihaug (module docstring; Xu, Roosta & Mahoney 2020).

    Args:
        params: the parameters (one group).
        radius: the initial radius :math:`\Delta_0` (the authors' network code: 5, its demos 1000;
            the result is insensitive to it over orders of magnitude, their robustness claim).
        max_radius: the cap :math:`\Delta_{\max}` (default unbounded).
        min_radius: below it a rejected iteration ends without a step.
        eta1, eta2, gamma1, gamma2: the ratio thresholds and radius factors.
        hessian_fraction: :math:`|S|/n` of the uniform Hessian sample (0.05, as in the papers).
        curvature: ``"hessian"`` (exact products on the sample) or ``"gauss-newton"``.
        cg_rtol, cg_maxiter: CG-Steihaug's relative residual and iteration cap (1e-9, 250).
        random_start: start CG from a random vector of norm :math:`0.99\Delta` (default), so that
            negative curvature the gradient misses is found (saddle escape); False starts at 0.
            The start's size costs digits: the step :math:`s_0 + \ldots` is summed from a vector
            of norm :math:`0.99\Delta`, so it carries a rounding error of about
            :math:`\varepsilon\Delta` (2e-10 at :math:`\Delta = 10^6` in float64).
        max_rejections: consecutive rejected trials before an iteration gives up.
        seed: the generator of the samples and the random starts.
        distributed: ``"auto"``, True, False or a reducer (:mod:`secondorder.optim.subsampled`).

    After each ``step(closure)``, ``last_step`` is a :class:`~secondorder.optim.subsampled.NewtonStep`.

    """

    parameter = "radius"

    def __init__(self, params, radius: float = 1.0, *, max_radius: float = math.inf, min_radius: float = 1e-12,
                 eta1: float = 0.8, eta2: float = 1e-4, gamma1: float = 2.0, gamma2: float = 1.2,
                 hessian_fraction: float = 0.05, curvature: str = "hessian", cg_rtol: float = 1e-9,
                 cg_maxiter: int = 250, random_start: bool = True, max_rejections: int = 30, seed: int = 0,
                 distributed: bool | str | Reducer = "auto") -> None:
        validation.positive_finite(radius, "radius")
        validation.positive_finite(min_radius, "min_radius")
        if not max_radius >= radius:
            raise ValueError(f"max_radius ({max_radius}) must be at least radius ({radius})")
        _check_rules(eta1, eta2, gamma1, gamma2, max_rejections)
        validation.tolerance(cg_rtol, "cg_rtol")
        validation.positive_int(cg_maxiter, "cg_maxiter")
        defaults = dict(max_radius=float(max_radius), min_radius=float(min_radius), eta1=eta1, eta2=eta2,
                        gamma1=gamma1, gamma2=gamma2, cg_rtol=cg_rtol, cg_maxiter=cg_maxiter,
                        random_start=bool(random_start), max_rejections=max_rejections)
        super().__init__(params, defaults, hessian_fraction=hessian_fraction, curvature=curvature, seed=seed,
                         distributed=distributed)
        self.radius = float(radius)

    def _solve(self, H: SampledCurvature, grad: Tensor, previous: SubproblemResult | None) -> SubproblemResult:
        group = self.param_groups[0]
        start = None
        if previous is not None and float(previous.step.norm()) > 0:
            start = 0.99 * self.radius * previous.step / previous.step.norm()
        elif previous is None and group["random_start"]:
            xi = torch.randn(grad.shape, generator=self.generator, device=grad.device, dtype=grad.dtype)
            start = 0.99 * self.radius * xi / xi.norm()
        return steihaug(H, grad, self.radius, start=start, rtol=group["cg_rtol"], maxiter=group["cg_maxiter"])

    def _update(self, ratio: float) -> bool:
        group = self.param_groups[0]
        if not ratio >= group["eta2"]:
            if self.radius <= group["min_radius"]:
                return False
            self.radius = max(self.radius / group["gamma1"], group["min_radius"])
            return True
        factor = group["gamma2"] if ratio < group["eta1"] else group["gamma1"]
        self.radius = min(self.radius * factor, group["max_radius"])
        return True

    def _value(self) -> float:
        return self.radius

    def _scalars(self) -> dict:
        return {"radius": self.radius}

    def _load_scalars(self, values: dict) -> None:
        self.radius = values["radius"]


class CubicRegularization(_RatioTest):
    r"""Sub-sampled adaptive cubic regularization, ARC (module docstring; Xu, Roosta & Mahoney 2020).

    Args:
        params: the parameters (one group).
        sigma: the initial :math:`\sigma_0` (the authors' code: 1; their least-squares demo 1e-4).
        min_sigma: the floor :math:`\sigma_{\min}` of successful decreases (code: 0; here a tiny
            positive number, as the model needs :math:`\sigma > 0`).
        max_sigma: above it a rejected iteration ends without a step.
        eta1, eta2, gamma1, gamma2: the ratio thresholds and the factors.
        hessian_fraction, curvature, seed, distributed: as :class:`TrustRegion`.
        lanczos_rtol: stop Lanczos when the sub-problem gradient is below it times :math:`\|g\|`.
        lanczos_maxiter: the cap on Lanczos steps (250, as the authors').
        lanczos_noise: the relative perturbation of the Lanczos start (0 starts at :math:`g`).
        max_rejections: consecutive rejected trials before an iteration gives up.

    """

    parameter = "sigma"

    def __init__(self, params, sigma: float = 1.0, *, min_sigma: float = 1e-10, max_sigma: float = 1e12,
                 eta1: float = 0.8, eta2: float = 1e-4, gamma1: float = 2.0, gamma2: float = 1.2,
                 hessian_fraction: float = 0.05, curvature: str = "hessian", lanczos_rtol: float = 1e-2,
                 lanczos_maxiter: int = 250, lanczos_noise: float = 1e-2, max_rejections: int = 30,
                 seed: int = 0, distributed: bool | str | Reducer = "auto") -> None:
        validation.positive_finite(sigma, "sigma")
        validation.positive_finite(min_sigma, "min_sigma")
        if not min_sigma <= sigma <= max_sigma:
            raise ValueError(f"need min_sigma <= sigma <= max_sigma, got {min_sigma}, {sigma}, {max_sigma}")
        _check_rules(eta1, eta2, gamma1, gamma2, max_rejections)
        validation.tolerance(lanczos_rtol, "lanczos_rtol")
        validation.positive_int(lanczos_maxiter, "lanczos_maxiter")
        validation.non_negative(lanczos_noise, "lanczos_noise")
        defaults = dict(min_sigma=float(min_sigma), max_sigma=float(max_sigma), eta1=eta1, eta2=eta2,
                        gamma1=gamma1, gamma2=gamma2, lanczos_rtol=lanczos_rtol, lanczos_maxiter=lanczos_maxiter,
                        lanczos_noise=float(lanczos_noise), max_rejections=max_rejections)
        super().__init__(params, defaults, hessian_fraction=hessian_fraction, curvature=curvature, seed=seed,
                         distributed=distributed)
        self.sigma = float(sigma)

    def _solve(self, H: SampledCurvature, grad: Tensor, previous: SubproblemResult | None) -> SubproblemResult:
        group = self.param_groups[0]
        return cubic(H, grad, self.sigma, rtol=group["lanczos_rtol"], maxiter=group["lanczos_maxiter"],
                     noise=group["lanczos_noise"], seed=self.generator)

    def _update(self, ratio: float) -> bool:
        group = self.param_groups[0]
        if not ratio >= group["eta2"]:
            if self.sigma >= group["max_sigma"]:
                return False
            self.sigma = min(self.sigma * group["gamma1"], group["max_sigma"])
            return True
        factor = group["gamma2"] if ratio < group["eta1"] else group["gamma1"]
        self.sigma = max(self.sigma / factor, group["min_sigma"])
        return True

    def _value(self) -> float:
        return self.sigma

    def _scalars(self) -> dict:
        return {"sigma": self.sigma}

    def _load_scalars(self, values: dict) -> None:
        self.sigma = values["sigma"]
