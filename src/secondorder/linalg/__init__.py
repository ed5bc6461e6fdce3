"""Randomized numerical linear algebra on any operator or dense symmetric tensor."""

from secondorder.linalg.blocks import block_eigenvalues
from secondorder.linalg.density import spectral_density
from secondorder.linalg.diagonal import diagonal
from secondorder.linalg.eigen import eigenvalues
from secondorder.linalg.results import (
    BlockTrace,
    DiagonalResult,
    EigenResult,
    SolveResult,
    SpectralDensityResult,
    SubproblemResult,
    TraceResult,
)
from secondorder.linalg.solve import solve
from secondorder.linalg.subproblems import cubic, steihaug
from secondorder.linalg.trace import trace

__all__ = [
    "BlockTrace",
    "DiagonalResult",
    "EigenResult",
    "SolveResult",
    "SpectralDensityResult",
    "SubproblemResult",
    "TraceResult",
    "block_eigenvalues",
    "cubic",
    "diagonal",
    "eigenvalues",
    "solve",
    "spectral_density",
    "steihaug",
    "trace",
]
