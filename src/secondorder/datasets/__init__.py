"""Small, offline data sets and problems for exercising curvature code."""

from secondorder.datasets.colored_digits import (
    ENV_FLIP_PROBS,
    DigitEnvironment,
    colored_digit_environments,
    colored_digits,
)
from secondorder.datasets.default import Problem, default_problem
from secondorder.datasets.digit_tokens import (
    DigitTransformer,
    TrainedDigitTransformer,
    load_digit_tokens,
    train_digit_transformer,
)
from secondorder.datasets.mnist1d import Mnist1dCNN, TrainedMnist1d, load_mnist1d, train_mnist1d
from secondorder.datasets.synthetic import batches, gaussian_mixture

__all__ = ["ENV_FLIP_PROBS", "DigitEnvironment", "DigitTransformer", "colored_digit_environments", "colored_digits",
           "Mnist1dCNN", "Problem", "TrainedDigitTransformer", "TrainedMnist1d", "batches", "default_problem",
           "gaussian_mixture", "load_digit_tokens", "load_mnist1d", "train_digit_transformer", "train_mnist1d"]
