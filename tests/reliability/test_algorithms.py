"""Algorithms and operators: bad arguments and bad data get one clear error at the earliest point,
and leave the model, its modes, buffers, flags and the global RNGs as they were."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import secondorder
from secondorder.optim import AdaHessian
from tests.reliability.faults import Refusal, parametrize
from tests.reliability.snapshot import Snapshot

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(12, 3, generator=G, dtype=torch.float64), torch.randint(0, 2, (12,), generator=G)
BATCHES = [(X[:4], Y[:4]), (X[4:8], Y[4:8]), (X[8:], Y[8:])]


def _model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Tanh(), nn.Linear(4, 2)).double().train()


class _Shrinking:
    """A re-iterable whose passes yield 3, 2, 1, ... batches (a changing operator)."""

    def __init__(self):
        self.n = 4

    def __iter__(self):
        self.n = max(1, self.n - 1)
        return iter(BATCHES[: self.n])


class _Reshaping:
    """A re-iterable whose second pass yields its last batch with one sample more."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(BATCHES[:2] + [(X[7:], Y[7:])] if self.passes > 2 else BATCHES)


def _on_operator(call, data=BATCHES, model=_model, **kwargs):
    """Set-up: an operator on a fresh model, and ``call(operator)``."""
    def setup():
        m = model()
        op = secondorder.HessianOperator(m, F.cross_entropy, data() if callable(data) else data, **kwargs)
        return (lambda: call(op)), Snapshot(m)
    return setup


def _building(make):
    """Set-up: ``make(model)`` must be refused (at construction)."""
    def setup():
        m = _model()
        return (lambda: make(m)), Snapshot(m)
    return setup


def _detached(m):
    return lambda outputs, targets: F.cross_entropy(outputs.detach(), targets)


def _meta_model():
    with torch.device("meta"):
        return nn.Linear(3, 2)


P = 4 * 3 + 4 + 2 * 4 + 2
NAN = torch.full((P,), float("nan"), dtype=torch.float64)

CASES = [
    Refusal("eigenvalues tol=inf", _on_operator(lambda op: secondorder.eigenvalues(op, tol=float("inf"))),
            ValueError, "tol must be a relative tolerance"),
    Refusal("eigenvalues tol=nan", _on_operator(lambda op: secondorder.eigenvalues(op, tol=float("nan"))),
            ValueError, "tol must be a relative tolerance"),
    Refusal("eigenvalues tol=1", _on_operator(lambda op: secondorder.eigenvalues(op, tol=1.0)),
            ValueError, "tol must be a relative tolerance"),
    Refusal("eigenvalues tol below float64 roundoff", _on_operator(lambda op: secondorder.eigenvalues(op, tol=1e-20)),
            ValueError, "below what float64 products resolve"),
    Refusal("block_eigenvalues tol=nan", _on_operator(
        lambda op: secondorder.block_eigenvalues(op, tol=float("nan"), k=1)), ValueError, "relative tolerance"),
    Refusal("solve tol=inf", _on_operator(lambda op: secondorder.solve(op, torch.ones(P, dtype=torch.float64),
                                                                       tol=float("inf"))),
            ValueError, "tol must be a relative tolerance"),
    Refusal("passes yield fewer batches", _on_operator(lambda op: secondorder.eigenvalues(op, seed=0), data=_Shrinking),
            ValueError, "the data changed between passes: pass 2"),
    Refusal("a batch changes shape between passes",
            _on_operator(lambda op: secondorder.trace(op, 6, seed=0), data=_Reshaping),
            ValueError, "the data changed between passes: pass 2 yielded batch 2 with 5 samples"),
    Refusal("an empty batch among others", _on_operator(lambda op: op @ torch.ones(P, dtype=torch.float64),
                                                        data=BATCHES[:1] + [(X[:0], Y[:0])] + BATCHES[1:]),
            ValueError, "batch 1 is empty"),
    Refusal("a NaN vector", _on_operator(lambda op: op @ NAN), ValueError, "vector 0 of the 1 multiplied has NaN"),
    Refusal("a NaN probe in quadratic forms", _on_operator(lambda op: op.quadratic_forms(NAN)),
            ValueError, "has NaN or infinite entries"),
    Refusal("a loss that does not depend on the parameters",
            lambda: (lambda m: ((lambda: secondorder.HessianOperator(m, _detached(m), BATCHES) @ NAN.nan_to_num(1.0)),
                                Snapshot(m)))(_model()),
            ValueError, "does not depend on the parameters"),
    Refusal("the gradient of a detached loss",
            lambda: (lambda m: ((lambda: secondorder.HessianOperator(m, _detached(m), BATCHES).loss_and_gradient()),
                                Snapshot(m)))(_model()),
            ValueError, "does not depend on the parameters"),
    Refusal("a model on the meta device", lambda: ((lambda: secondorder.HessianOperator(
        _meta_model(), F.cross_entropy, BATCHES)), Snapshot()), ValueError, "meta device"),
    Refusal("operator seed=2**70", _building(lambda m: secondorder.HessianOperator(m, F.cross_entropy, BATCHES,
                                                                                   seed=2**70)),
            ValueError, "seed must be an integer in 0..2\\*\\*62"),
    Refusal("operator seed='x'", _building(lambda m: secondorder.HessianOperator(m, F.cross_entropy, BATCHES,
                                                                                 seed="x")),
            ValueError, "seed must be an integer"),
    Refusal("trace seed=2**70", _on_operator(lambda op: secondorder.trace(op, 6, seed=2**70)),
            ValueError, "seed must be an integer in 0..2\\*\\*62"),
    Refusal("optimizer seed=2**70", _building(lambda m: AdaHessian(m.parameters(), seed=2**70)),
            ValueError, "seed must be an integer in 0..2\\*\\*62"),
]


@parametrize(CASES)
def test_refused(case):
    case.check()
