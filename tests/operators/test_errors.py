"""Bad input gets a clear error that says what to do, and nothing is mutated."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder as so
from tests.cases import data, mlp, ragged


@pytest.fixture
def problem():
    model = mlp(bn=True)
    model.train()
    X, y = data("mlp", "ce")
    return model, X, y


def _unchanged(model, before, training):
    assert model.training == training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_empty_data(problem):
    model, X, y = problem
    A = so.HessianOperator(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="no batches"):
        A @ torch.ones(A.shape[0], dtype=torch.float64)


def test_one_shot_iterator_rejected(problem):
    model, X, y = problem
    with pytest.raises(TypeError, match="one-shot iterator"):
        so.HessianOperator(model, F.cross_entropy, (b for b in ragged(X, y)))


def test_non_scalar_loss(problem):
    model, X, y = problem
    A = so.HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), (X, y))
    with pytest.raises(ValueError, match="reduction='mean'"):
        A @ torch.ones(A.shape[0], dtype=torch.float64)


def test_shape_mismatch(problem):
    model, X, y = problem
    A = so.HessianOperator(model, F.cross_entropy, (X, y))
    for bad in (torch.ones(A.shape[0] + 1), torch.ones(A.shape[0], 2, 2), torch.ones(3, A.shape[0])):
        with pytest.raises(ValueError, match=f"\\[{A.shape[0]}\\]"):
            A @ bad
    with pytest.raises(TypeError):
        A @ [1.0, 2.0]


def test_unknown_parameter_names_suggest(problem):
    model, X, y = problem
    with pytest.raises(ValueError, match="did you mean '0.weight'"):
        so.HessianOperator(model, F.cross_entropy, (X, y), params=["0.weigth"])
    with pytest.raises(ValueError, match="no parameters selected"):
        so.HessianOperator(model, F.cross_entropy, (X, y), params=lambda n, p: False)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        so.HessianOperator(model, F.cross_entropy, (X, y), params=["0.bias"])


def test_non_finite_loss_names_the_batch(problem):
    model, X, y = problem
    before, training = copy.deepcopy(model.state_dict()), model.training
    X = X.clone()
    X[7, 0] = math.nan  # in the second batch of (5, 5, 3)
    A = so.HessianOperator(model, F.cross_entropy, ragged(X, y))
    rng = torch.get_rng_state()
    with pytest.raises(so.NonFiniteError, match="batch 1"):
        A @ torch.ones(A.shape[0], dtype=torch.float64)
    _unchanged(model, before, training)
    assert torch.equal(torch.get_rng_state(), rng)


def test_non_finite_curvature_names_the_batch():
    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))

        def forward(self, x):
            return (x * self.w.abs().sqrt()).sum(1, keepdim=True)  # infinite second derivative at w = 0

    model = Sqrt()
    batches = [(torch.ones(2, 2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))] * 3
    A = so.HessianOperator(model, F.mse_loss, batches)
    with pytest.raises(so.NonFiniteError, match="batch 0"):
        A @ torch.ones(2, dtype=torch.float64)


def test_unknown_backend(problem):
    model, X, y = problem
    with pytest.raises(ValueError, match="'auto', 'loop', 'vmap' or 'jvp'"):
        so.HessianOperator(model, F.cross_entropy, (X, y), backend="jax")


def test_ggn_rejects_closure(problem):
    model, X, y = problem
    with pytest.raises(ValueError, match="needs the model outputs"):
        so.GGNOperator(model, lambda m, b: m(b[0]).sum(), (X, y), closure=True)


def test_batch_layout_needs_closure(problem):
    model, X, y = problem
    A = so.HessianOperator(model, F.cross_entropy, [(X, y, y)])
    with pytest.raises(ValueError, match="closure=True"):
        A @ torch.ones(A.shape[0], dtype=torch.float64)


def test_algorithm_argument_errors():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="1 <= k < P = 5"):
        so.eigenvalues(A, 5)
    with pytest.raises(ValueError, match="num_matvecs >= 1"):
        so.trace(A, 0, method="hutchinson")
    with pytest.raises(ValueError, match="num_matvecs >= 1"):
        so.diagonal(A, 0)
    with pytest.raises(ValueError, match="symmetric"):
        so.trace(A + torch.triu(torch.ones(5, 5, dtype=torch.float64), 1), 3)
    with pytest.raises(ValueError, match="num_probes"):
        so.spectral_density(A, 0)
    with pytest.raises(TypeError, match="LinearOperator or a dense"):
        so.trace([[1.0]], 3)


def test_blocks_must_tile_and_one_sample_has_no_error_bar():
    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="tile"):
        so.DenseOperator(A, blocks=[so.Block("a", 0, 10)])
    with pytest.raises(ValueError, match="tile"):
        so.DenseOperator(A, blocks=[so.Block("a", 0, 10), so.Block("b", 11, 20)])
    one = so.trace(A, 1, method="hutchinson", seed=0)
    assert one.stderr == math.inf and one.confidence_interval() == (-math.inf, math.inf)
