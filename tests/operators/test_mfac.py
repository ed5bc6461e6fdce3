"""MFACOperator against dense float64 solves of lambda I + G^T G / m: inverse products and diagonal,
after ring-buffer insertions, blockwise, a float16 window, a model's gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.operators.mfac import MFACOperator
from tests.cases import gen

D = torch.float64


def _dense(G: torch.Tensor, damping: float, block_size: int | None = None) -> torch.Tensor:
    m, d = G.shape
    F = damping * torch.eye(d, dtype=D) + G.T.double() @ G.double() / m
    if block_size is None:
        return F
    mask = torch.zeros(d, d, dtype=torch.bool)
    for s in range(0, d, block_size):
        mask[s:s + block_size, s:s + block_size] = True
    return F * mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_inverse_products_and_diagonal_equal_a_dense_solve():
    G, X = torch.randn(32, 2000, generator=gen(1), dtype=D), torch.randn(2000, 3, generator=gen(2), dtype=D)
    op = MFACOperator.from_gradients(G, 1e-3)
    F = _dense(G, 1e-3)
    assert _rel(op @ X, F @ X) < 1e-13
    assert _rel(op.inverse() @ X, torch.linalg.solve(F, X)) < 1e-8
    assert _rel(op.inverse_diagonal(), torch.linalg.inv(F).diagonal()) < 1e-8
    assert _rel(op.inverse() @ X[:, 0], torch.linalg.solve(F, X[:, 0])) < 1e-8  # a vector too


def test_the_ring_buffer_keeps_the_last_m_gradients():
    m, d = 8, 50
    rows = torch.randn(3 * m + 3, d, generator=gen(3), dtype=D)
    op = MFACOperator(m, d, 0.1, dtype=D)
    assert torch.equal(op.inverse() @ rows[0], rows[0] / 0.1)  # empty: lambda I
    for r in rows:
        op.add(r)
    F = _dense(rows[-m:], 0.1)  # the order within the window does not matter
    assert _rel(op.to_dense(), F) < 1e-13
    assert _rel(op.inverse().to_dense(), torch.linalg.inv(F)) < 1e-10
    assert _rel(op.inverse_diagonal(), torch.linalg.inv(F).diagonal()) < 1e-10
    half = MFACOperator(m, d, 0.1, dtype=D)
    for r in rows[:3]:
        half.add(r)
    assert _rel(half.to_dense(), 0.1 * torch.eye(d, dtype=D) + rows[:3].T @ rows[:3] / m) < 1e-13  # 1/m kept


def test_blockwise_is_the_block_diagonal_and_a_float16_window_its_rounded_rows():
    G, X = torch.randn(6, 300, generator=gen(4), dtype=D), torch.randn(300, 2, generator=gen(5), dtype=D)
    op = MFACOperator.from_gradients(G, 0.05, block_size=128)  # chunks of 128, 128, 44
    F = _dense(G, 0.05, 128)
    assert op.num_chunks == 3 and _rel(op.to_dense(), F) < 1e-13
    assert _rel(op.inverse() @ X, torch.linalg.solve(F, X)) < 1e-10
    assert _rel(op.inverse_diagonal(), torch.linalg.inv(F).diagonal()) < 1e-10
    half = MFACOperator.from_gradients(G, 0.05, storage_dtype=torch.float16)
    assert half.gradients.dtype == torch.float16 and half.dtype == D
    rounded = _dense(G.half().double(), 0.05)
    assert _rel(half.inverse() @ X, torch.linalg.solve(rounded, X)) < 1e-10


def test_every_algorithm_runs_on_it():
    G = torch.randn(5, 40, generator=gen(6), dtype=D)
    op, F = MFACOperator.from_gradients(G, 0.2), _dense(G, 0.2)
    top = so.eigenvalues(op, 2, seed=0)
    assert torch.allclose(top.eigenvalues, torch.linalg.eigvalsh(F).flip(0)[:2], rtol=1e-10)
    b = torch.randn(40, generator=gen(7), dtype=D)
    assert _rel(so.solve(op, b, tol=1e-12).solution, op.inverse() @ b) < 1e-9


def test_a_models_gradients_per_batch_and_per_sample():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(7, 3, generator=gen(8), dtype=D), torch.tensor([0, 1, 1, 0, 1, 0, 0])
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    loss = nn.CrossEntropyLoss()
    params = list(net.parameters())

    def grad(xs, ys):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(net(xs), ys), params)])

    per_batch = MFACOperator.from_model(net, loss, batches, 1e-2)
    want = torch.stack([grad(*b) for b in batches])
    assert torch.allclose(per_batch.gradients, want, rtol=1e-13) and per_batch.window == 2
    assert [b.name for b in per_batch.blocks] == ["0", "2"]
    per_sample = MFACOperator.from_model(net, loss, batches, 1e-2, rows="sample")
    samples = torch.stack([grad(X[i:i + 1], y[i:i + 1]) for i in range(7)])
    fisher = samples.T @ samples / 7  # the empirical Fisher of the mean loss
    assert torch.allclose(per_sample.to_dense(), 1e-2 * torch.eye(per_sample.shape[0], dtype=D) + fisher, rtol=1e-12)
    assert net.training  # the mode untouched


def test_bad_input_is_refused_and_changes_nothing():
    with pytest.raises(ValueError, match="window"):
        MFACOperator(0, 10, 0.1)
    for damping in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping"):
            MFACOperator(4, 10, damping)
    with pytest.raises(ValueError, match="block_size"):
        MFACOperator(4, 10, 0.1, block_size=0)
    with pytest.raises(ValueError, match=r"\[m, d\]"):
        MFACOperator.from_gradients(torch.zeros(10), 0.1)
    op = MFACOperator(4, 10, 0.1, dtype=D)
    op.add(torch.ones(10, dtype=D))
    before = (op.gradients.clone(), op.gram.clone(), op.num_added)
    with pytest.raises(ValueError, match="has 10 entries"):
        op.add(torch.ones(9, dtype=D))
    bad = torch.ones(10, dtype=D)
    bad[3] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        op.add(bad)
    assert torch.equal(op.gradients, before[0]) and torch.equal(op.gram, before[1]) and op.num_added == before[2]


def test_large_gradients_and_tiny_damping_in_float32_fall_back_to_a_float64_gram():
    """Nearly equal rows of norm ~1e4 at lambda = 1e-9 (GG^T nearly singular): a float32 Gram
    entry's rounding (~eps ||g||^2) dwarfs m lambda and K = GG^T + m lambda I comes out
    indefinite; the window then accumulates its Gram matrix in float64 (exact for the stored rows)
    instead of failing."""
    G = 100 * torch.randn(1, 20000, generator=gen(9)).repeat(8, 1) + 1e-2 * torch.randn(8, 20000, generator=gen(11))
    op = MFACOperator.from_gradients(G, 1e-9)
    exact = G.double() @ G.double().T
    assert torch.allclose(op._gram(None, exact=True)[0], exact, rtol=1e-13)
    fast = op._gram(None, exact=False)
    assert op._try_cholesky(fast) is None  # the float32 Gram alone fails here
    assert torch.allclose(op.gram[0], exact, rtol=1e-13)
    op.add(G[0] + 1e-2 * torch.randn(20000, generator=gen(10)))  # an insertion takes the same way out
    assert torch.allclose(op.gram[0], op._gram(None, exact=True)[0], rtol=1e-13)
