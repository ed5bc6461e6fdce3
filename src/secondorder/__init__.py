"""secondorder: second-order machine learning in PyTorch.

Matrix-free curvature operators (:class:`HessianOperator`, :class:`GGNOperator`) over a
batch or a whole data set, and randomized numerical linear algebra on them
(:func:`trace`, :func:`diagonal`, :func:`eigenvalues`, :func:`spectral_density`,
:func:`solve`). Every algorithm accepts any :class:`LinearOperator` or a plain dense
symmetric tensor.
"""

from secondorder import optim, schedules
from secondorder.linalg import (
    DiagonalResult,
    EigenResult,
    SolveResult,
    SpectralDensityResult,
    TraceResult,
    block_eigenvalues,
    diagonal,
    eigenvalues,
    solve,
    spectral_density,
    trace,
)
from secondorder.operators import (
    Block,
    DenseOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    KFACOperator,
    LinearOperator,
    MFACOperator,
    NonFiniteError,
    as_operator,
)

__version__ = "0.1.0"

__all__ = [
    "Block",
    "DenseOperator",
    "DiagonalResult",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACOperator",
    "MFACOperator",
    "LinearOperator",
    "NonFiniteError",
    "SolveResult",
    "SpectralDensityResult",
    "TraceResult",
    "as_operator",
    "optim",
    "schedules",
    "block_eigenvalues",
    "diagonal",
    "eigenvalues",
    "solve",
    "spectral_density",
    "trace",
]
