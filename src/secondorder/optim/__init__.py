"""Second-order optimizers as drop-in ``torch.optim`` optimizers (no ``backward(create_graph=True)``).

The diagonal ones (AdaHessian, Sophia) are each a curvature estimator
(:mod:`~secondorder.optim.estimators`) and an update rule (:mod:`~secondorder.optim.updates`) on
the shared core (:mod:`~secondorder.optim.base`); the Newton-type ones (TrustRegion,
CubicRegularization, NewtonMR) take a full gradient and a sub-sampled Hessian
(:mod:`~secondorder.optim.subsampled`) and solve a sub-problem per step.
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
from secondorder.optim.kfac import KFAC
from secondorder.optim.mfac import MFAC
from secondorder.optim.newton_mr import NewtonMR
from secondorder.optim.sophia import SophiaG, SophiaH
from secondorder.optim.subsampled import NewtonStep
from secondorder.optim.trust_region import CubicRegularization, TrustRegion
from secondorder.optim.updates import spatial_average

__all__ = [
    "AdaHessian", "CubicRegularization", "CurvatureEstimator", "Estimate", "GaussNewtonBartlett",
    "HutchinsonGaussian", "HutchinsonRademacher", "KFAC", "MFAC", "NewtonMR", "NewtonStep", "SophiaG", "SophiaH",
    "StepContext", "TrustRegion", "spatial_average",
]
