r"""Newton-MR: MINRES steps with a line search, for non-convex problems (Roosta, Liu, Xu & Mahoney
2018, arXiv:1810.00303; the non-convex variant of Liu & Roosta 2022, arXiv:2208.07095).

Each outer iteration takes the full loss :math:`f_0` and gradient :math:`g` and the Hessian
:math:`H_S` of a uniform sample (:mod:`secondorder.optim.subsampled`), and runs MINRES on
:math:`H_S p = -g` (:func:`~secondorder.linalg.solve` with ``curvature=True``) until

* the inexactness condition :math:`\langle g, H_S p\rangle \le -(1-\theta)\|g\|^2`
  (``inexactness`` :math:`\theta`, the original paper's) holds: the step is :math:`p` with
  Armijo backtracking :math:`F(x+\alpha p) \le f_0 + \rho\alpha g^\top p` from :math:`\alpha = 1`,
  halving (the non-convex variant's line search on :math:`F`; the original searched on
  :math:`\|\nabla F\|^2`, which also converges to saddles); or
* MINRES meets non-positive curvature (MINRES-NPC): the direction is the residual :math:`r`, a
  descent direction (:math:`g^\top r = -\|r\|^2`) of non-positive curvature along which the
  model is unbounded below, so the search runs **forward**: from the last such step size
  :math:`\alpha_{\rm npc}`, doubled while Armijo holds (or halved until it does), and
  :math:`\alpha_{\rm npc}` keeps the result for the next time.

A MINRES run that ends at its iteration cap takes the solution branch (``cap_as_curvature``
takes the residual branch instead, as the authors' code does). A line search that finds no
Armijo point within ``max_backtracks`` halvings ends the iteration without a step; a trial whose
loss is not strictly below :math:`f_0` fails Armijo (at a point flat to rounding the forward
search would otherwise double to ``max_step_size`` on zero decrease). Defaults:
:math:`\theta = 10^{-2}`, :math:`\rho = 10^{-4}` (the authors' drivers), MINRES at most 200
iterations.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

from secondorder import validation
from secondorder.distributed.reducer import Reducer
from secondorder.linalg.solve import solve
from secondorder.optim.subsampled import NewtonStep, SampledCurvature, SubsampledNewton


class NewtonMR(SubsampledNewton):
    r"""Sub-sampled Newton-MR with the non-positive-curvature branch (module docstring).

    Args:
        params: the parameters (one group).
        inexactness: :math:`\theta` in :math:`\langle g, Hp\rangle \le -(1-\theta)\|g\|^2`.
        armijo: :math:`\rho` of the sufficient-decrease condition.
        minres_maxiter: the cap on MINRES iterations.
        max_backtracks: the cap on halvings (and on doublings of the forward search).
        max_step_size: the cap of the forward search's step size.
        cap_as_curvature: treat a MINRES run that reached its cap like a curvature exit.
        hessian_fraction, curvature, seed, distributed: as :class:`~secondorder.optim.TrustRegion`.

    """

    def __init__(self, params, *, inexactness: float = 1e-2, armijo: float = 1e-4, minres_maxiter: int = 200,
                 max_backtracks: int = 50, max_step_size: float = 1e10, cap_as_curvature: bool = False,
                 hessian_fraction: float = 0.05, curvature: str = "hessian", seed: int = 0,
                 distributed: bool | str | Reducer = "auto") -> None:
        validation.tolerance(inexactness, "inexactness")
        if not 0 < armijo < 0.5:
            raise ValueError(f"armijo (the sufficient-decrease constant) must be in (0, 0.5), got {armijo}")
        validation.positive_int(minres_maxiter, "minres_maxiter")
        validation.positive_int(max_backtracks, "max_backtracks")
        if not (max_step_size >= 1 and math.isfinite(max_step_size)):
            raise ValueError(f"max_step_size must be a finite number >= 1, got {max_step_size}")
        defaults = dict(inexactness=inexactness, armijo=armijo, minres_maxiter=minres_maxiter,
                        max_backtracks=max_backtracks, max_step_size=float(max_step_size),
                        cap_as_curvature=bool(cap_as_curvature))
        super().__init__(params, defaults, hessian_fraction=hessian_fraction, curvature=curvature, seed=seed,
                         distributed=distributed)
        self.curvature_step_size = 1.0

    def _iterate(self, closure: Callable, params: list[Tensor], loss: float, grad: Tensor, H: SampledCurvature,
                 reducer: Reducer) -> NewtonStep:
        group = self.param_groups[0]
        result = solve(H, -grad, method="minres", tol=1e-14, maxiter=group["minres_maxiter"], curvature=True,
                       inexactness=group["inexactness"])
        assert result.exits is not None and result.directions is not None, "asked for"
        exit = result.exits[0]
        npc = exit == "negative curvature" or (exit == "iterations" and group["cap_as_curvature"])
        direction = result.directions if npc else result.solution
        slope = float(grad @ direction)
        if not slope < 0:  # no descent along the solution (a capped run): the residual always descends
            npc, direction, slope = True, result.directions, float(grad @ result.directions)
        if not slope < 0:  # a zero gradient (a stationary point of the sample's model): nothing to search
            alpha, new_loss = 0.0, loss
        elif npc:
            alpha, new_loss = self._forward(closure, params, loss, slope, direction, reducer)
        else:
            alpha, new_loss = self._backtrack(closure, params, loss, slope, direction, 1.0, reducer)
        accepted = alpha > 0
        if accepted and npc:
            self.curvature_step_size = alpha
        return self._record(H, loss=loss, new_loss=new_loss, accepted=accepted, trials=self._costs["functions"],
                            ratio=None, radius=None, sigma=None, step_size=alpha,
                            step_norm=alpha * float(direction.norm()), exit=exit,
                            subproblem_iterations=result.iterations)

    def _armijo(self, closure: Callable, params: list[Tensor], loss: float, slope: float, direction: Tensor,
                alpha: float, reducer: Reducer) -> float | None:
        """The loss at ``x + alpha p`` if it satisfies Armijo (the parameters stay there), else None (set back)."""
        new = self._try(closure, params, direction, reducer, alpha)
        if math.isfinite(new) and new <= loss + self.param_groups[0]["armijo"] * alpha * slope and new < loss:
            return new  # (strictly lower too: a sufficient decrease lost to rounding is no decrease)
        self._place(params)
        return None

    def _backtrack(self, closure: Callable, params: list[Tensor], loss: float, slope: float, direction: Tensor,
                   alpha: float, reducer: Reducer) -> tuple[float, float]:
        """Halve from ``alpha`` until Armijo holds: (step size, loss), (0, loss) if it never does."""
        for _ in range(self.param_groups[0]["max_backtracks"] + 1):
            new = self._armijo(closure, params, loss, slope, direction, alpha, reducer)
            if new is not None:
                return alpha, new
            alpha /= 2
        return 0.0, loss

    def _forward(self, closure: Callable, params: list[Tensor], loss: float, slope: float, direction: Tensor,
                 reducer: Reducer) -> tuple[float, float]:
        """From the last curvature step size: double while Armijo holds, or halve until it does."""
        group = self.param_groups[0]
        alpha = self.curvature_step_size
        new = self._armijo(closure, params, loss, slope, direction, alpha, reducer)
        if new is None:
            return self._backtrack(closure, params, loss, slope, direction, alpha / 2, reducer)
        for _ in range(group["max_backtracks"]):
            if 2 * alpha > group["max_step_size"]:
                break
            larger = self._armijo(closure, params, loss, slope, direction, 2 * alpha, reducer)
            if larger is None:
                self._place(params, direction, alpha)  # keep the last good one
                break
            alpha, new = 2 * alpha, larger
        return alpha, new

    def _scalars(self) -> dict:
        return {"curvature_step_size": self.curvature_step_size}

    def _load_scalars(self, values: dict) -> None:
        self.curvature_step_size = values["curvature_step_size"]
