import math

import pytest
import torch
from torch import nn

from secondorder.datasets import Problem, batches, default_problem, gaussian_mixture


def test_gaussian_mixture_shapes_and_dtypes():
    x, y = gaussian_mixture(num_samples=100, num_features=7, num_classes=3, seed=1)
    assert x.shape == (100, 7)
    assert x.dtype == torch.float32
    assert y.shape == (100,)
    assert y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 3
    assert torch.isfinite(x).all()
    # balanced up to one sample
    counts = torch.bincount(y, minlength=3)
    assert int(counts.max() - counts.min()) <= 1


def test_gaussian_mixture_defaults():
    x, y = gaussian_mixture()
    assert x.shape == (1024, 16)
    assert set(y.tolist()) == {0, 1, 2, 3}


def test_gaussian_mixture_float64_matches_float32():
    x32, y32 = gaussian_mixture(seed=3, dtype=torch.float32)
    x64, y64 = gaussian_mixture(seed=3, dtype=torch.float64)
    assert x64.dtype == torch.float64
    assert torch.equal(y32, y64)
    assert torch.allclose(x64.float(), x32)


def test_gaussian_mixture_deterministic_given_seed():
    a = gaussian_mixture(seed=5)
    b = gaussian_mixture(seed=5)
    c = gaussian_mixture(seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_gaussian_mixture_leaves_global_rng_alone():
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    gaussian_mixture(seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_gaussian_mixture_independent_of_global_rng():
    torch.manual_seed(1)
    a = gaussian_mixture(seed=0)
    torch.manual_seed(2)
    b = gaussian_mixture(seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"num_features": 0}, {"num_classes": 0}])
def test_gaussian_mixture_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        gaussian_mixture(**kwargs)


def test_batches_cover_all_samples_with_ragged_last():
    x, y = gaussian_mixture(num_samples=10, num_features=3, num_classes=2)
    bs = batches(x, y, 4)
    assert [len(b[0]) for b in bs] == [4, 4, 2]
    assert [len(b[1]) for b in bs] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in bs]), x)
    assert torch.equal(torch.cat([b[1] for b in bs]), y)


def test_batches_exact_and_oversized():
    x, y = gaussian_mixture(num_samples=8, num_features=2, num_classes=2)
    assert [len(b[0]) for b in batches(x, y, 4)] == [4, 4]
    assert [len(b[0]) for b in batches(x, y, 100)] == [8]


def test_batches_rejects_bad_input():
    x, y = gaussian_mixture(num_samples=8, num_features=2, num_classes=2)
    with pytest.raises(ValueError):
        batches(x, y, 0)
    with pytest.raises(ValueError):
        batches(x, y[:-1], 4)


@pytest.fixture(scope="module")
def problem():
    return default_problem(seed=0)


def test_default_problem_structure(problem):
    assert isinstance(problem, Problem)
    assert isinstance(problem.loss_fn, nn.CrossEntropyLoss)
    linears = [m for m in problem.model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 4)]
    assert [len(x) for x, _ in problem.data] == [256, 256, 256, 256]
    assert all(p.requires_grad and p.grad is None for p in problem.model.parameters())
    with pytest.raises(AttributeError):
        problem.model = None  # frozen


def test_default_problem_is_trained(problem):
    n = 0
    total_loss = 0.0
    correct = 0
    with torch.no_grad():
        for x, y in problem.data:
            logits = problem.model(x)
            total_loss += float(problem.loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            n += len(y)
    assert n == 1024
    loss = total_loss / n
    assert loss < 0.5 < math.log(4)
    assert correct / n > 0.8


def test_default_problem_deterministic_and_rng_neutral():
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a = default_problem(seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    b = default_problem(seed=0)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
