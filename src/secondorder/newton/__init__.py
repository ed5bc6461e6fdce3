"""Distributed Newton without inversion bias: a single-process simulator of q machines (torch.distributed engine to come).

Dereziński & Mahoney, "Distributed estimation of the inverse Hessian by determinantal
averaging" (NeurIPS 2019); Dereziński, Bartan, Pilanci & Mahoney, "Debiasing distributed second
order optimization with surrogate sketching and scaled regularization" (NeurIPS 2020).

* :mod:`~secondorder.newton.problems`: regularized logistic / ridge regression, exact Newton.
* :mod:`~secondorder.newton.sketches`: row sketches of the Hessian square root, the ridge DPP,
  the surrogate sketch.
* :mod:`~secondorder.newton.combine`: local directions, uniform / determinantal averaging,
  scaled regularization.
* :mod:`~secondorder.newton.simulator`: q virtual machines in one process.
"""

from secondorder.newton.combine import (
    CombinedDirection,
    LocalSolves,
    ScaledRegularization,
    combine,
    determinantal_weights,
    local_directions,
    scaled_regularization,
    sketched_hessians,
)
from secondorder.newton.problems import (
    GLMProblem,
    LogisticRegression,
    NewtonResult,
    RidgeRegression,
    armijo_step,
    effective_dimension,
    newton_solve,
)
from secondorder.newton.simulator import (
    DistributedStep,
    SimulationResult,
    StepError,
    distributed_direction,
    draw_sketches,
    machine_generators,
    one_step_error,
    simulate,
)
from secondorder.newton.sketches import (
    RidgeDPP,
    RowSketch,
    gaussian_sketch,
    leverage_sketch,
    poisson_sketch,
    ridge_leverage_scores,
    row_probabilities,
    sample_rows,
    surrogate_sketch,
    uniform_sketch,
)

__all__ = [
    "CombinedDirection", "DistributedStep", "GLMProblem", "LocalSolves", "LogisticRegression",
    "NewtonResult", "RidgeDPP", "RidgeRegression", "RowSketch", "ScaledRegularization",
    "SimulationResult", "StepError", "armijo_step", "combine", "determinantal_weights",
    "distributed_direction", "draw_sketches", "effective_dimension", "gaussian_sketch",
    "leverage_sketch", "local_directions", "machine_generators", "newton_solve",
    "one_step_error", "poisson_sketch", "ridge_leverage_scores", "row_probabilities",
    "sample_rows", "scaled_regularization", "simulate", "sketched_hessians",
    "surrogate_sketch", "uniform_sketch",
]
