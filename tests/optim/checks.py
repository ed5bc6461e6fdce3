"""Checks every optimizer must pass."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tests.operators.test_curvature import data, mlp


def assert_resumes_bitwise(make_optimizer, steps: int = 5) -> None:
    """Train ``steps``, save, train ``steps`` more; a fresh model and optimizer (built with another
    seed) loaded from the save must reproduce the second half bit for bit."""
    X, y = data("mlp", "ce")
    model = mlp()
    opt = make_optimizer(model.parameters(), seed=3)
    closure = lambda m: (lambda: F.cross_entropy(m(X), y))  # noqa: E731
    for _ in range(steps):
        opt.step(closure(model))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(steps):
        opt.step(closure(model))
    resumed = mlp()
    resumed.load_state_dict(saved_model)
    opt2 = make_optimizer(resumed.parameters(), seed=99)
    opt2.load_state_dict(saved_opt)
    for _ in range(steps):
        opt2.step(closure(resumed))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
