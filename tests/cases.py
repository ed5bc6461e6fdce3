"""Shared test cases: small models, data and batchings that the test packages build on.

Dense references for them are in :mod:`tests.references`.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.references import tiny_mlp_problem


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def mlp(out: int = 3, bn: bool = False) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = [nn.Linear(5, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, out)]
        model = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics and affine parameters
        with torch.no_grad():
            model[1].running_mean.uniform_(-0.5, 0.5, generator=gen(1))
            model[1].running_var.uniform_(0.5, 2.0, generator=gen(2))
            model[1].weight.uniform_(0.5, 1.5, generator=gen(3))
    return model


def cnn(out: int = 3, bn: bool = False) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = [nn.Conv2d(1, 2, 3)] + ([nn.BatchNorm2d(2)] if bn else [])
        layers += [nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, out)]
        return nn.Sequential(*layers).double()


def data(kind: str, loss: str, n: int = 13, out: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(7)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64) if kind == "mlp" else torch.randn(
        n, 1, 6, 6, generator=g, dtype=torch.float64
    )
    if loss == "ce":
        y = torch.randint(0, out, (n,), generator=g)
    elif loss == "mse":
        y = torch.randn(n, out, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (n, out), generator=g).double()
    return X, y


LOSSES = {"ce": nn.CrossEntropyLoss(), "mse": nn.MSELoss(), "bce": nn.BCEWithLogitsLoss()}


def ragged(X, y, sizes=(5, 5, 3)):
    out, i = [], 0
    for s in sizes:
        out.append((X[i : i + s], y[i : i + s]))
        i += s
    return out


def names(model):
    return [n for n, _ in model.named_parameters()]


class KeywordModel(nn.Module):
    """An MLP whose forward takes its input as the keyword ``features`` (dict-input batches)."""

    def __init__(self):
        super().__init__()
        self.inner = mlp()

    def forward(self, features):
        return self.inner(features)


def tiny_problem(seed: int = 0):
    """A tiny MLP on 32 samples in ragged batches of at most 20 (weighted by size)."""
    return tiny_mlp_problem(seed, 32, 20)
