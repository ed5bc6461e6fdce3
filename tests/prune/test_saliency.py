"""The OBS compensating update and saliencies against dense float64 solves of the quadratic model."""

from __future__ import annotations

import pytest
import torch

from secondorder import MFACOperator
from secondorder.prune import obd_saliency, obs_saliency, obs_update, select_pruned

D = torch.float64


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def dense_fisher(G: torch.Tensor, damping: float, block: int) -> torch.Tensor:
    """The block-diagonal lambda I + G_b^T G_b / m over chunks of ``block`` coordinates, dense."""
    m, d = G.shape
    F = damping * torch.eye(d, dtype=D)
    for lo in range(0, d, block):
        hi = min(d, lo + block)
        F[lo:hi, lo:hi] += G[:, lo:hi].T @ G[:, lo:hi] / m
    return F


@pytest.fixture
def problem():
    G, w = randn(6, 20, seed=1), randn(20, seed=2)
    op = MFACOperator.from_gradients(G, 0.1, block_size=8)  # chunks 8, 8, 4
    return op, dense_fisher(G, 0.1, 8), w


def test_inverse_blocks_are_the_dense_block_inverses(problem):
    op, F, _ = problem
    blocks = op.inverse_blocks()
    assert blocks.shape == (3, 8, 8)
    Finv = torch.linalg.inv(F)
    for b, (lo, hi) in enumerate([(0, 8), (8, 16), (16, 20)]):
        torch.testing.assert_close(blocks[b, : hi - lo, : hi - lo], Finv[lo:hi, lo:hi], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chosen", [[3], [0, 5, 7, 9, 19], [1, 2, 3, 4, 5, 6, 7, 12, 17], list(range(0, 20, 2))])
def test_obs_update_is_the_constrained_minimiser(problem, chosen):
    op, F, w = problem
    Q = torch.zeros(20, dtype=torch.bool)
    Q[chosen] = True
    delta = obs_update(op, w, Q)
    assert torch.equal((w + delta)[Q], torch.zeros(int(Q.sum()), dtype=D))  # removes exactly the chosen weights
    # min 1/2 d^T F d  s.t. d_Q = -w_Q: the free part solves F_RR d_R = -F_RQ d_Q (dense float64)
    R = ~Q
    want = torch.zeros(20, dtype=D)
    want[Q] = -w[Q]
    want[R] = torch.linalg.solve(F[R][:, R], F[R][:, Q] @ w[Q])
    torch.testing.assert_close(delta, want, rtol=1e-8, atol=1e-10)
    # the closed form of the note, dense: -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q, and its loss increase
    Finv = torch.linalg.inv(F)
    E = torch.eye(20, dtype=D)[:, Q]
    closed = -Finv @ E @ torch.linalg.solve(E.T @ Finv @ E, w[Q])
    torch.testing.assert_close(delta, closed, rtol=1e-8, atol=1e-10)
    cost = 0.5 * delta @ F @ delta
    torch.testing.assert_close(cost, 0.5 * w[Q] @ torch.linalg.solve(E.T @ Finv @ E, w[Q]), rtol=1e-8, atol=0)
    for seed in range(5):  # any other feasible perturbation costs more
        other = delta + randn(20, seed=10 + seed) * R
        assert 0.5 * other @ F @ other > cost


def test_single_weight_formula_and_saliency(problem):
    op, F, w = problem
    Finv = torch.linalg.inv(F)
    for q in (0, 11, 19):
        Q = torch.zeros(20, dtype=torch.bool)
        Q[q] = True
        delta = obs_update(op, w, Q)
        torch.testing.assert_close(delta, -w[q] * Finv[:, q] / Finv[q, q], rtol=1e-8, atol=1e-12)
        rho = obs_saliency(w, op.inverse_diagonal())[q]
        torch.testing.assert_close(rho, w[q] ** 2 / (2 * Finv[q, q]), rtol=1e-8, atol=0)
        torch.testing.assert_close(0.5 * delta @ F @ delta, rho, rtol=1e-8, atol=0)  # the loss increase


def test_nothing_pruned_moves_nothing(problem):
    op, _, w = problem
    assert torch.equal(obs_update(op, w, torch.zeros(20, dtype=torch.bool)), torch.zeros(20, dtype=D))


def test_obd_saliency_uses_the_given_diagonal():
    w, h = randn(7, seed=3), randn(7, seed=4)
    torch.testing.assert_close(obd_saliency(w, h), 0.5 * w**2 * h, rtol=0, atol=0)
    with pytest.raises(ValueError, match="entries"):
        obd_saliency(w, h[:5])
    with pytest.raises(ValueError, match="finite"):
        obd_saliency(w, torch.full((7,), float("nan"), dtype=D))


def test_select_pruned_breaks_ties_by_position_and_keeps_earlier_pruning():
    s = torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0, 1.0])
    assert select_pruned(s, 3).tolist() == [True, True, False, True, False, False]
    already = torch.tensor([False, False, False, False, False, True])
    assert select_pruned(s, 2, already).tolist() == [False, False, False, True, False, True]
    with pytest.raises(ValueError, match="pruned already"):
        select_pruned(s, 0, already)
    with pytest.raises(ValueError, match="NaN"):
        select_pruned(torch.tensor([float("nan"), 1.0]), 1)


def test_bad_shapes_raise(problem):
    op, _, w = problem
    with pytest.raises(ValueError, match="20 entries"):
        obs_update(op, w[:10], torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive"):
        obs_saliency(w, -torch.ones(20, dtype=D))
