r"""Single-process engine: q virtual machines of distributed sketched Newton, vectorized.

Iteration t (the communication pattern of GIANT / determinantal averaging / scaled
regularization, simulated in one process; see :mod:`secondorder.newton.engine` for the loop):

1. exact global gradient :math:`g_t = \nabla L(w_t)` (one all-reduce in a real run);
2. every machine k draws its own sketch of its data's Hessian square root from its own
   ``torch.Generator`` and forms :math:`\hat H_k = \tilde A_k^\top\tilde A_k + \lambda_{loc} I`,
   with :math:`\lambda_{loc} = \lambda` or the scaled :math:`\lambda' = \lambda(1 - d_\lambda/m)`;
3. local directions :math:`\hat p_k = \hat H_k^{-1} g_t`, batched over [q, d, d];
4. combine (uniform or determinantal averaging; times :math:`1 - d_\lambda/m` under scaled
   regularization) into :math:`\bar p_t` (the second all-reduce).

A machine's data is either the whole data set (``shards=None``: every machine samples from all
rows, as in the papers' experiments where q m exceeds n) or its own shard (``shards``: a
partition of the rows into q parts, what a real run with one shard per process does; the
:class:`~secondorder.newton.processes.ProcessCluster` then gives the same iterates).

:math:`d_\lambda` is ``"exact"`` (of the global Hessian) or ``"estimated"`` (the mean over
machines of their own data's :math:`d_\lambda`: a scalar all-reduce instead of a d x d one; the
same as exact without shards).

Machine k's generator is seeded from ``(seed, k)`` with ``numpy.random.SeedSequence``, so a run
with q machines reproduces q independent single-machine computations draw for draw.
Pitfalls (from the research notes): unit steps from w = 0 can diverge on nearly separable
data (use the line search, or start in the local regime); sketches need m > d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from secondorder.newton.combine import (
    AVERAGING,
    combine,
    local_directions,
    local_directions_cg,
    local_regularization,
    sketched_hessians,
    stacked_rows,
)
from secondorder.newton.engine import (
    EFFECTIVE_DIMS,
    DistributedStep,
    NewtonRun,
    run_newton,
)
from secondorder.newton.problems import GLMProblem, as_weights, effective_dimension
from secondorder.newton.sketches import (
    RidgeDPP,
    RowSketch,
    check_sketch_size,
    gaussian_sketch,
    less_sketch,
    poisson_sketch,
    row_probabilities,
    sample_rows,
    surrogate_sketch,
)
from secondorder.validation import positive_int

SKETCHES = ("uniform", "leverage", "poisson", "gaussian", "less", "less-uniform", "surrogate", "surrogate-leverage")
"""Row sampling (uniform, ridge leverage, Poisson), Gaussian, LESS with leverage or uniform
(Newton-LESS) non-zeros, and the surrogate sketch with a uniform or leverage i.i.d. part."""
LOCAL_SOLVERS = ("cholesky", "cg")


def machine_generator(seed: int, machine: int) -> torch.Generator:
    """Machine ``machine``'s ``torch.Generator``, seeded from ``SeedSequence([seed, machine])``."""
    state = np.random.SeedSequence([int(seed), int(machine)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def machine_generators(seed: int, machines: int) -> list[torch.Generator]:
    """One independent generator per machine (:func:`machine_generator` for k = 0..q-1)."""
    return [machine_generator(seed, k) for k in range(positive_int(machines, "machines (q)"))]


@dataclass(frozen=True)
class SketchConfig:
    r"""What every machine does: ``sketch`` of ``sketch_size`` rows, ``averaging``, scaled
    regularization on or off, how :math:`d_\lambda` is obtained, and the local solver
    (``"cholesky"``: exact, with log-determinants; ``"cg"``: GIANT's ``cg_iterations`` steps of
    matrix-free conjugate gradients). Validated on creation.
    """

    sketch_size: int
    sketch: str = "uniform"
    averaging: str = "uniform"
    scaled_regularization: bool | None = None
    effective_dim: str = "exact"
    local_solver: str = "cholesky"
    cg_iterations: int = 10

    def __post_init__(self) -> None:
        if self.sketch not in SKETCHES:
            raise ValueError(f"sketch must be one of {SKETCHES}, got {self.sketch!r}")
        if self.averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {AVERAGING}, got {self.averaging!r}")
        if self.effective_dim not in EFFECTIVE_DIMS:
            raise ValueError(f"effective_dim must be one of {EFFECTIVE_DIMS}, got {self.effective_dim!r}")
        if self.local_solver not in LOCAL_SOLVERS:
            raise ValueError(f"local_solver must be one of {LOCAL_SOLVERS}, got {self.local_solver!r}")
        if self.local_solver == "cg" and self.averaging == "determinantal":
            raise ValueError("determinantal averaging needs the local log-determinants, which CG does not give; "
                             "use local_solver='cholesky'")
        scaled = self.scaled_regularization
        if self.sketch.startswith("surrogate"):
            if scaled is False:
                raise ValueError(
                    "the surrogate sketch is defined with the scaled regularizer "
                    "lambda' = lambda (1 - d_lambda/m); leave scaled_regularization as None or True"
                )
            scaled = True
        object.__setattr__(self, "scaled_regularization", bool(scaled))

    def check(self, dim: int) -> None:
        """Raise if the sketch size does not exceed the dimension."""
        check_sketch_size(self.sketch_size, dim)

    def local_solves(self, factors: Sequence[Tensor], lam: float, d_lam: float,
                     generators: Sequence[torch.Generator], gradient: Tensor):
        """Steps 2-3 for the machines owning ``generators``; ``factors`` holds one factor per
        machine, or a single one all of them sample from. Returns (LocalSolves, local regularization).
        """
        reg = local_regularization(lam, d_lam, self.sketch_size, bool(self.scaled_regularization))
        if len(factors) == 1:
            sketches = draw_sketches(factors[0], self.sketch_size, lam, self.sketch, generators)
        else:
            sketches = [draw_sketches(f, self.sketch_size, lam, self.sketch, [g])[0]
                        for f, g in zip(factors, generators)]
        if self.local_solver == "cg":
            return local_directions_cg(stacked_rows(sketches), reg.local_lam, gradient, self.cg_iterations), reg
        return local_directions(sketched_hessians(sketches, reg.local_lam), gradient), reg


def draw_sketches(
    factor: Tensor, m: int, lam: float, sketch: str, generators: Sequence[torch.Generator]
) -> list[RowSketch]:
    """Each machine's sketch of ``factor`` from its own generator (shared precomputation:
    sampling probabilities, the DPP's eigendecomposition).
    """
    if sketch in ("uniform", "leverage"):
        probs = row_probabilities(factor, sketch, lam)
        return [sample_rows(factor, m, probs, g) for g in generators]
    if sketch == "poisson":
        return [poisson_sketch(factor, m, g) for g in generators]
    if sketch == "gaussian":
        return [gaussian_sketch(factor, m, g) for g in generators]
    if sketch in ("less", "less-uniform"):
        distribution = "uniform" if sketch == "less-uniform" else "leverage"
        return [less_sketch(factor, m, lam, g, distribution=distribution) for g in generators]
    if sketch in ("surrogate", "surrogate-leverage"):
        dpp = RidgeDPP.from_factor(factor, lam)
        distribution = "leverage" if sketch == "surrogate-leverage" else "uniform"
        return [surrogate_sketch(factor, m, lam, g, distribution=distribution, dpp=dpp) for g in generators]
    raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")


def check_shards(shards: Sequence[Tensor], num_samples: int) -> list[Tensor]:
    """``shards`` as index tensors, checked to be a partition of ``range(num_samples)`` into
    non-empty parts (every row in exactly one shard, so the shards' sums are the global ones).
    """
    parts = [torch.as_tensor(s, dtype=torch.long).flatten() for s in shards]
    empty = [k for k, s in enumerate(parts) if s.numel() == 0]
    if empty:
        raise ValueError(f"shards {empty[:5]} are empty; every machine needs at least one row")
    counts = torch.bincount(torch.cat(parts), minlength=num_samples) if parts else torch.zeros(0)
    if len(counts) != num_samples or bool((counts != 1).any()):
        raise ValueError(
            f"shards must partition the {num_samples} rows (each row in exactly one shard); "
            f"{int((counts == 0).sum())} rows are in none and {int((counts > 1).sum())} in several"
        )
    return parts


def random_shards(num_samples: int, parts: int, seed: int = 0) -> list[Tensor]:
    """A seeded random partition of ``range(num_samples)`` into ``parts`` shards of nearly equal size."""
    if parts > num_samples:
        raise ValueError(f"cannot split {num_samples} rows into {parts} non-empty shards; use fewer machines")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed)))
    return [part.sort().values for part in torch.tensor_split(perm, parts)]


class SimulatedCluster:
    """q virtual machines in one process (see the module docstring); implements
    :class:`~secondorder.newton.engine.Cluster`.
    """

    def __init__(
        self,
        problem: GLMProblem,
        *,
        machines: int,
        config: SketchConfig,
        shards: Sequence[Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        config.check(problem.dim)
        self.problem = problem
        self.config = config
        self.generators = machine_generators(seed, machines)
        self.machines = len(self.generators)
        self.dim, self.lam = problem.dim, problem.lam
        self.shards = None
        if shards is not None:
            if len(shards) != self.machines:
                raise ValueError(f"got {len(shards)} shards for {self.machines} machines; give one per machine")
            self.shards = [problem.subset(s) for s in check_shards(shards, problem.num_samples)]

    def gradient(self, w: Tensor) -> Tensor:
        return self.problem.gradient(w)

    def losses(self, points: Tensor) -> Tensor:
        return self.problem.losses(points)

    def hessian(self, w: Tensor) -> Tensor:
        return self.problem.hessian(w)

    def agree(self, facts: dict[str, Any], *, what: str) -> None:
        """Nothing to agree on: the machines share this process."""

    def direction(self, w: Tensor, gradient: Tensor) -> DistributedStep:
        factor = self.problem.hessian_factor(w)
        factors = [factor] if self.shards is None else [s.hessian_factor(w) for s in self.shards]
        if self.config.effective_dim == "exact" or self.shards is None:
            d_lam = effective_dimension(factor, self.lam)
        else:
            d_lam = sum(effective_dimension(f, self.lam) for f in factors) / len(factors)
        solves, reg = self.config.local_solves(factors, self.lam, d_lam, self.generators, gradient)
        combined = combine(solves, self.config.averaging, reg.step_scale)
        return DistributedStep(combined, d_lam, reg.local_lam)


def simulate(
    problem: GLMProblem,
    *,
    machines: int,
    sketch_size: int,
    iterations: int = 10,
    sketch: str = "uniform",
    averaging: str = "uniform",
    scaled_regularization: bool | None = None,
    effective_dim: str = "exact",
    shards: Sequence[Tensor] | None = None,
    line_search: bool = True,
    w0: Tensor | None = None,
    w_star: Tensor | None = None,
    seed: int = 0,
    callback=None,
) -> NewtonRun:
    """Run ``iterations`` of distributed sketched Newton with q = ``machines`` virtual machines.

    ``scaled_regularization`` None means: on for the surrogate sketches, off otherwise.
    ``w_star`` defaults to the exact Newton solution (gradient norm 1e-12). See
    :func:`~secondorder.newton.engine.run_newton` for ``callback``.
    """
    config = SketchConfig(sketch_size, sketch, averaging, scaled_regularization, effective_dim)
    cluster = SimulatedCluster(problem, machines=machines, config=config, shards=shards, seed=seed)
    return run_newton(cluster, iterations=iterations, line_search=line_search, w0=w0,
                      w_star=w_star, callback=callback)


def subsampled_newton(
    problem: GLMProblem,
    *,
    sample_size: int,
    iterations: int = 10,
    line_search: bool = True,
    w0: Tensor | None = None,
    w_star: Tensor | None = None,
    seed: int = 0,
) -> NewtonRun:
    r"""Sub-sampled Newton (Roosta-Khorasani & Mahoney 2016; Bollapragada, Byrd & Nocedal 2016):
    exact gradient, Hessian from ``sample_size`` rows drawn uniformly each iteration,
    :math:`w \leftarrow w - \eta\,\hat H^{-1} g` with Armijo backtracking. It is the
    one-machine case of the simulator.
    """
    return simulate(problem, machines=1, sketch_size=sample_size, iterations=iterations,
                    line_search=line_search, w0=w0, w_star=w_star, seed=seed)


@dataclass(frozen=True)
class StepError:
    r"""One-step estimation error :math:`\|\bar p - p^*\|/\|p^*\|` at a fixed w, with both steps."""

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
    effective_dim: str = "exact",
    shards: Sequence[Tensor] | None = None,
    seed: int = 0,
) -> StepError:
    """Relative error of the combined step against the exact Newton step :math:`p^* = H^{-1}g` at ``w``."""
    w = as_weights(problem.dim, w)
    g = problem.gradient(w)
    exact = torch.linalg.solve(problem.hessian(w), g)
    norm = float(exact.norm())
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError("the exact Newton step at w is zero (w is the optimum); pick another w")
    config = SketchConfig(sketch_size, sketch, averaging, scaled_regularization, effective_dim)
    cluster = SimulatedCluster(problem, machines=machines, config=config, shards=shards, seed=seed)
    step = cluster.direction(w, g)
    p = step.combined.direction
    return StepError(float((p - exact).norm()) / norm, p, exact, step.combined.effective_sample_size)
