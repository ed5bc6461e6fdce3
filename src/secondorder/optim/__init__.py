"""Second-order optimizers as drop-in ``torch.optim`` optimizers (no ``backward(create_graph=True)``).

Each is a curvature estimator (:mod:`~secondorder.optim.estimators`) and an update rule
(:mod:`~secondorder.optim.updates`) on the shared core (:mod:`~secondorder.optim.base`).
"""

from secondorder.optim.adahessian import AdaHessian
from secondorder.optim.estimators import (
    CurvatureEstimator,
    Estimate,
    GaussNewtonBartlett,
    HutchinsonGaussian,
    HutchinsonRademacher,
    StepContext,
)
from secondorder.optim.sophia import SophiaG, SophiaH
from secondorder.optim.updates import spatial_average

__all__ = [
    "AdaHessian", "CurvatureEstimator", "Estimate", "GaussNewtonBartlett", "HutchinsonGaussian",
    "HutchinsonRademacher", "SophiaG", "SophiaH", "StepContext", "spatial_average",
]
