"""Small seeded synthetic problems and Monte-Carlo helpers for the newton tests."""

from __future__ import annotations

import torch
from torch import Tensor

from secondorder.newton import LogisticRegression, RidgeRegression

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logistic_problem(n: int = 60, d: int = 4, lam: float = 0.05, seed: int = 0) -> LogisticRegression:
    g = gen(seed)
    x = torch.randn(n, d, dtype=F64, generator=g)
    w = torch.randn(d, dtype=F64, generator=g)
    noise = torch.randn(n, dtype=F64, generator=g)
    y = torch.where(x @ w + noise > 0, 1.0, -1.0).to(F64)
    return LogisticRegression(x, y, lam)


def ridge_problem(n: int = 60, d: int = 4, lam: float = 0.05, seed: int = 0) -> RidgeRegression:
    g = gen(seed)
    x = torch.randn(n, d, dtype=F64, generator=g)
    y = x @ torch.randn(d, dtype=F64, generator=g) + torch.randn(n, dtype=F64, generator=g)
    return RidgeRegression(x, y, lam)


def coherent_factor(n: int = 40, d: int = 3, heavy: int = 3, seed: int = 0) -> Tensor:
    """A factor with a few heavy (high-leverage) rows, where the inversion bias is large."""
    g = gen(seed)
    a = torch.randn(n, d, dtype=F64, generator=g) / n**0.5
    a[:heavy] *= 6.0
    return a


def within_standard_errors(samples: Tensor, target: Tensor, k: float = 5.0) -> bool:
    """Is the Monte-Carlo mean of ``samples`` [N, ...] within k standard errors of ``target``
    (entrywise; entries with zero variance must match to 1e-12)?"""
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    return bool(((mean - target).abs() <= k * se + 1e-12).all())
