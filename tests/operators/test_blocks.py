"""Per-block quantities: diagonal blocks, per-layer traces and per-layer eigenvalues."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import secondorder as so
from tests.cases import data, names
from tests.references import dense_hessian


def wide_mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def test_block_operator_is_the_diagonal_block():
    model = wide_mlp()
    X, y = data("mlp", "ce")
    H = so.HessianOperator(model, F.cross_entropy, (X, y))
    full = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    for b in H.blocks:
        assert (H.block(b.name).to_dense() - full[b.start : b.stop, b.start : b.stop]).abs().max() <= 1e-12


def test_block_eigenvalues_match_dense_blocks_in_one_call():
    model = wide_mlp()
    X, y = data("mlp", "ce")
    H = so.HessianOperator(model, F.cross_entropy, (X, y))  # blocks: 72 and 39 coordinates
    full = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    results = so.block_eigenvalues(H, k=2, seed=0)
    assert list(results) == ["0", "2"]
    for b in H.blocks:
        exact = torch.linalg.eigvalsh(full[b.start : b.stop, b.start : b.stop]).flip(0)[:2]
        r = results[b.name]
        assert r.converged.all()
        assert (r.eigenvalues - exact).abs().max() <= 1e-9 * exact.abs().max()


def test_per_layer_traces_sum_and_are_unbiased():
    model = wide_mlp()
    X, y = data("mlp", "ce")
    H = so.HessianOperator(model, F.cross_entropy, (X, y))
    full = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    seeds = range(40)
    estimates = torch.tensor([[b.value for b in so.trace(H, 12, method="hutchinson", seed=s).blocks] for s in seeds])
    exact = torch.tensor([full[b.start : b.stop, b.start : b.stop].trace() for b in H.blocks], dtype=torch.float64)
    sem = estimates.std(0) / len(seeds) ** 0.5
    assert ((estimates.mean(0) - exact).abs() <= 4 * sem).all()  # unbiased: within 4 standard errors of the mean
    one = so.trace(H, 12, seed=0)
    assert abs(sum(b.value for b in one.blocks) - one.value) <= 1e-12 * abs(one.value)
    assert one.block("2").per_parameter == one.block("2").value / 39


def test_progress_wrapper_forwards_chunking_and_quadratic_forms(capsys):
    model = wide_mlp()
    X, y = data("mlp", "ce")
    H = so.HessianOperator(model, F.cross_entropy, (X, y), chunk_size=2)
    quiet = so.trace(H, 6, method="hutchinson", seed=1)
    shown = so.trace(H, 6, method="hutchinson", seed=1, progress=True)
    assert shown == quiet and shown.num_matvecs == 6
    assert H.num_matvecs == 12
    assert "trace (hutchinson)" in capsys.readouterr().err
