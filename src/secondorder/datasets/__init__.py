"""Small, offline data sets and problems for exercising curvature code."""

from secondorder.datasets.default import Problem, default_problem
from secondorder.datasets.synthetic import batches, gaussian_mixture

__all__ = ["Problem", "batches", "default_problem", "gaussian_mixture"]
