"""Small, offline data sets and problems for exercising curvature code."""

from secondorder.datasets.default import Problem, default_problem
from secondorder.datasets.mnist1d import Mnist1dCNN, TrainedMnist1d, load_mnist1d, train_mnist1d
from secondorder.datasets.synthetic import batches, gaussian_mixture

__all__ = ["Mnist1dCNN", "Problem", "TrainedMnist1d", "batches", "default_problem", "gaussian_mixture",
           "load_mnist1d", "train_mnist1d"]
