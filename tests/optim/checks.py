"""Checks every optimizer must pass."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from secondorder.distributed.reducer import LOCAL
from secondorder.optim import StepContext
from tests.cases import data, mlp


def refresh_context(seed: int) -> StepContext:
    """A local curvature-refresh step whose probes come from a generator seeded with ``seed``."""
    return StepContext(step=1, refresh=True, num_closures=1, loss_scale=1.0, reducer=LOCAL,
                       generator=torch.Generator().manual_seed(seed))


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


def assert_accumulation_equals_full_batch(make_optimizer, steps: int = 6) -> None:
    """Two equal micro-batch closures per step give the full-batch trajectory (float64, same probes)."""
    X, y = data("mlp", "ce", n=16)
    full, micro = mlp(), mlp()
    opt_full = make_optimizer(full.parameters())
    opt_micro = make_optimizer(micro.parameters())
    for _ in range(steps):
        loss_full = opt_full.step(lambda: F.cross_entropy(full(X), y))
        loss_micro = opt_micro.step([lambda: F.cross_entropy(micro(X[:8]), y[:8]),
                                     lambda: F.cross_entropy(micro(X[8:]), y[8:])])
        assert torch.allclose(loss_micro, loss_full, rtol=1e-13, atol=0)
    for p, q in zip(full.parameters(), micro.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
