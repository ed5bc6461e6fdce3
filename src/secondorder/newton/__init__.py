"""Distributed Newton without inversion bias: q machines simulated in one process, or real processes on torch.distributed.

Dereziński & Mahoney, "Distributed estimation of the inverse Hessian by determinantal
averaging" (NeurIPS 2019); Dereziński, Bartan, Pilanci & Mahoney, "Debiasing distributed second
order optimization with surrogate sketching and scaled regularization" (NeurIPS 2020);
Dereziński, Liao, Dobriban & Mahoney, "Sparse sketches with small inversion bias" (COLT 2021).

* :mod:`~secondorder.newton.problems`: regularized logistic / ridge regression, exact Newton.
* :mod:`~secondorder.newton.sketches`: row sketches of the Hessian square root, LESS, the ridge
  DPP, the surrogate sketch.
* :mod:`~secondorder.newton.combine`: local directions, uniform / determinantal averaging,
  scaled regularization.
* :mod:`~secondorder.newton.engine`: the Newton loop shared by both engines.
* :mod:`~secondorder.newton.simulator`: q virtual machines in one process.
* :mod:`~secondorder.newton.processes`: one machine per torch.distributed rank.
"""

from secondorder.newton.combine import (
    CombinedDirection,
    LocalSolves,
    ScaledRegularization,
    combine,
    determinantal_weights,
    local_directions,
    local_directions_cg,
    scaled_regularization,
    sketched_hessians,
)
from secondorder.newton.engine import (
    Cluster,
    DistributedStep,
    IterationRecord,
    NewtonRun,
    run_newton,
)
from secondorder.newton.problems import (
    GLMProblem,
    HessianAt,
    LogisticRegression,
    NewtonResult,
    RidgeRegression,
    armijo_step,
    effective_dimension,
    gram_effective_dimension,
    newton_solve,
)
from secondorder.newton.processes import ProcessCluster
from secondorder.newton.simulator import (
    SimulatedCluster,
    SketchConfig,
    StepError,
    draw_sketches,
    machine_generator,
    machine_generators,
    one_step_error,
    random_shards,
    simulate,
    subsampled_newton,
)
from secondorder.newton.sketches import (
    RidgeDPP,
    RowSketch,
    gaussian_sketch,
    less_sketch,
    leverage_sketch,
    poisson_sketch,
    ridge_leverage_scores,
    row_probabilities,
    sample_rows,
    surrogate_sketch,
    uniform_sketch,
)

__all__ = [
    "Cluster", "CombinedDirection", "DistributedStep", "GLMProblem", "HessianAt", "IterationRecord",
    "LocalSolves", "LogisticRegression", "NewtonResult", "NewtonRun", "ProcessCluster",
    "RidgeDPP", "RidgeRegression", "RowSketch", "ScaledRegularization", "SimulatedCluster",
    "SketchConfig", "StepError", "armijo_step", "combine", "determinantal_weights",
    "draw_sketches", "effective_dimension", "gaussian_sketch", "gram_effective_dimension",
    "less_sketch", "leverage_sketch", "local_directions", "local_directions_cg", "machine_generator",
    "machine_generators", "newton_solve", "one_step_error", "poisson_sketch", "random_shards",
    "ridge_leverage_scores", "row_probabilities", "run_newton", "sample_rows",
    "scaled_regularization", "simulate", "sketched_hessians", "subsampled_newton", "surrogate_sketch",
    "uniform_sketch",
]
