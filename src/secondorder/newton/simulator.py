r"""Single-process simulator of distributed sketched Newton with q virtual machines.

Iteration t (the communication pattern of GIANT / determinantal averaging / scaled
regularization, simulated in one process):

1. exact global gradient :math:`g_t = \nabla L(w_t)` (one all-reduce in a real run);
2. every machine k draws its own sketch of :math:`A(w_t)` from its own ``torch.Generator``
   and forms :math:`\hat H_k = \tilde A_k^\top\tilde A_k + \lambda_{loc} I`, with
   :math:`\lambda_{loc} = \lambda` or the scaled :math:`\lambda' = \lambda(1 - d_\lambda/m)`;
3. local directions :math:`\hat p_k = \hat H_k^{-1} g_t`, batched over [q, d, d];
4. combine (uniform or determinantal averaging; times :math:`1 - d_\lambda/m` under scaled
   regularization) into :math:`\bar p_t` (the second all-reduce);
5. :math:`w_{t+1} = w_t - \eta_t\bar p_t`, with Armijo backtracking on the global loss or
   :math:`\eta_t = 1`.

Machine k's generator is seeded from ``(seed, k)`` with ``numpy.random.SeedSequence``, so a run
with q machines reproduces q independent single-machine computations draw for draw.
Pitfalls (from the research notes): unit steps from w = 0 can diverge on nearly separable
data (use the line search, or start in the local regime); sketches need m > d.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from secondorder.newton.combine import (
    AVERAGING,
    CombinedDirection,
    combine,
    local_directions,
    sketched_hessians,
)
from secondorder.newton.combine import scaled_regularization as scaled_regularization_rule
from secondorder.newton.problems import (
    DTYPE,
    GLMProblem,
    _as_weights,
    armijo_step,
    effective_dimension,
    newton_solve,
)
from secondorder.newton.sketches import (
    RidgeDPP,
    RowSketch,
    _check_size,
    gaussian_sketch,
    poisson_sketch,
    row_probabilities,
    sample_rows,
    surrogate_sketch,
)

SKETCHES = ("uniform", "leverage", "poisson", "gaussian", "surrogate")


def machine_generators(seed: int, machines: int) -> list[torch.Generator]:
    """One independent ``torch.Generator`` per machine, seeded from ``SeedSequence([seed, k])``."""
    if isinstance(machines, bool) or int(machines) != machines or machines < 1:
        raise ValueError(f"machines (q) must be a positive integer, got {machines!r}")
    gens = []
    for k in range(int(machines)):
        state = np.random.SeedSequence([int(seed), k]).generate_state(1, np.uint64)[0]
        gens.append(torch.Generator().manual_seed(int(state) & ((1 << 63) - 1)))
    return gens


def _resolve_scaled(sketch: str, scaled: bool | None) -> bool:
    if sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
    if sketch == "surrogate":
        if scaled is False:
            raise ValueError(
                "the surrogate sketch is defined with the scaled regularizer "
                "lambda' = lambda (1 - d_lambda/m); leave scaled_regularization as None or True"
            )
        return True
    return bool(scaled)


def draw_sketches(
    factor: Tensor, m: int, lam: float, sketch: str, generators: list[torch.Generator]
) -> list[RowSketch]:
    """Each machine's sketch of ``factor`` from its own generator (shared precomputation:
    sampling probabilities, the DPP's eigendecomposition)."""
    if sketch in ("uniform", "leverage"):
        probs = row_probabilities(factor, sketch, lam)
        return [sample_rows(factor, m, probs, g) for g in generators]
    if sketch == "poisson":
        return [poisson_sketch(factor, m, g) for g in generators]
    if sketch == "gaussian":
        return [gaussian_sketch(factor, m, g) for g in generators]
    if sketch == "surrogate":
        dpp = RidgeDPP.from_factor(factor, lam)
        return [surrogate_sketch(factor, m, lam, g, dpp=dpp) for g in generators]
    raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")


@dataclass(frozen=True)
class DistributedStep:
    """One combined step: the ``combined`` direction, :math:`d_\\lambda(w)` and the local λ used."""

    combined: CombinedDirection
    effective_dim: float
    local_lam: float


def distributed_direction(
    problem: GLMProblem,
    w: Tensor,
    gradient: Tensor,
    generators: list[torch.Generator],
    *,
    sketch_size: int,
    sketch: str = "uniform",
    averaging: str = "uniform",
    scaled_regularization: bool | None = None,
) -> DistributedStep:
    """Steps 2-4 of the module docstring at ``w`` for the machines owning ``generators``."""
    scaled = _resolve_scaled(sketch, scaled_regularization)
    if averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
    m = _check_size(sketch_size, problem.dim)
    factor = problem.hessian_factor(w)
    d_lam = effective_dimension(factor, problem.lam)
    if scaled:
        rule = scaled_regularization_rule(problem.lam, d_lam, m)
        local_lam, step_scale = rule.local_lam, rule.step_scale
    else:
        local_lam, step_scale = problem.lam, 1.0
    sketches = draw_sketches(factor, m, problem.lam, sketch, generators)
    solves = local_directions(sketched_hessians(sketches, local_lam), gradient)
    return DistributedStep(combine(solves, averaging, step_scale), d_lam, local_lam)



@dataclass(frozen=True)
class SimulationResult:
    """Iterates [T+1, d] (``iterates[0]`` = start), relative errors
    :math:`\\|w_t - w^*\\|/\\|w^*\\|` [T+1], step sizes η_t [T], wall-clock seconds per iteration
    [T], effective sample sizes of the weights [T], and the reference ``w_star``."""

    iterates: Tensor
    relative_errors: Tensor
    step_sizes: Tensor
    times: Tensor
    effective_sample_sizes: Tensor
    w_star: Tensor


def _relative_error(w: Tensor, w_star: Tensor) -> float:
    return float((w - w_star).norm() / w_star.norm())


def _reference_solution(problem: GLMProblem, w_star: Tensor | None) -> Tensor:
    if w_star is None:
        w_star = newton_solve(problem).w
    w_star = _as_weights(problem, w_star)
    if float(w_star.norm()) == 0.0:
        raise ValueError("w_star is zero; relative errors ||w - w*||/||w*|| are undefined")
    return w_star


def simulate(
    problem: GLMProblem,
    *,
    machines: int,
    sketch_size: int,
    iterations: int = 10,
    sketch: str = "uniform",
    averaging: str = "uniform",
    scaled_regularization: bool | None = None,
    line_search: bool = True,
    w0: Tensor | None = None,
    w_star: Tensor | None = None,
    seed: int = 0,
) -> SimulationResult:
    """Run ``iterations`` of distributed sketched Newton with q = ``machines`` virtual machines.

    ``scaled_regularization`` None means: on for ``sketch="surrogate"``, off otherwise.
    ``w_star`` defaults to the exact Newton solution (gradient norm 1e-12).
    """
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    w_star = _reference_solution(problem, w_star)
    gens = machine_generators(seed, machines)
    w = torch.zeros(problem.dim, dtype=DTYPE) if w0 is None else _as_weights(problem, w0).clone()
    iterates, etas, times, ess = [w], [], [], []
    for _ in range(int(iterations)):
        start = time.perf_counter()
        g = problem.gradient(w)
        step = distributed_direction(
            problem, w, g, gens, sketch_size=sketch_size, sketch=sketch,
            averaging=averaging, scaled_regularization=scaled_regularization,
        )
        p = step.combined.direction
        eta = armijo_step(problem, w, p, g) if line_search else 1.0
        w = w - eta * p
        times.append(time.perf_counter() - start)
        iterates.append(w)
        etas.append(eta)
        ess.append(step.combined.effective_sample_size)
    stacked = torch.stack(iterates)
    errors = torch.tensor([_relative_error(v, w_star) for v in iterates], dtype=DTYPE)
    return SimulationResult(
        stacked, errors, torch.tensor(etas, dtype=DTYPE), torch.tensor(times, dtype=DTYPE),
        torch.tensor(ess, dtype=DTYPE), w_star,
    )


@dataclass(frozen=True)
class StepError:
    """One-step estimation error :math:`\\|\\bar p - p^*\\|/\\|p^*\\|` at a fixed w, with both steps."""

    error: float
    direction: Tensor
    exact_direction: Tensor
    effective_sample_size: float


def one_step_error(
    problem: GLMProblem,
    w: Tensor,
    *,
    machines: int,
    sketch_size: int,
    sketch: str = "uniform",
    averaging: str = "uniform",
    scaled_regularization: bool | None = None,
    seed: int = 0,
) -> StepError:
    """Relative error of the combined step against the exact Newton step :math:`p^* = H^{-1}g` at ``w``."""
    w = _as_weights(problem, w)
    g = problem.gradient(w)
    exact = torch.linalg.solve(problem.hessian(w), g)
    norm = float(exact.norm())
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError("the exact Newton step at w is zero (w is the optimum); pick another w")
    step = distributed_direction(
        problem, w, g, machine_generators(seed, machines), sketch_size=sketch_size,
        sketch=sketch, averaging=averaging, scaled_regularization=scaled_regularization,
    )
    p = step.combined.direction
    return StepError(float((p - exact).norm()) / norm, p, exact, step.combined.effective_sample_size)
