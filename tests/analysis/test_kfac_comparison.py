"""`analyze(curvature="kfac")`: K-FAC's numbers against dense K-FAC and GGN matrices, the distance
estimator's mean and error over seeds, zero where K-FAC is exact, the report and JSON round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.analysis import HessianAnalysis, analyze, summary_table, write_report
from secondorder.analysis.kfac_comparison import frobenius_distance, top_eigenvalues
from secondorder.operators.base import Block
from secondorder.operators.kfac import KFACOperator, KroneckerFactors
from tests.cases import gen, tiny_problem

D = torch.float64


@pytest.fixture(scope="module")
def problem():
    model, data = tiny_problem()
    return model, data, nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def result(problem):
    model, data, loss = problem
    return analyze(model, loss, data, curvature="kfac", top_k=3, bottom_k=0, trace_matvecs=30, slq_probes=2,
                   slq_steps=10, landscape=False, kfac_probes=40, seed=0)


def test_kfac_numbers_are_those_of_the_dense_matrices(problem, result):
    model, data, loss = problem
    K = so.KFACOperator(model, loss, data).to_dense()
    G = so.GGNOperator(model, loss, data).to_dense()
    assert torch.allclose(K, K.T, atol=1e-15) and torch.allclose(G, G.T, atol=1e-15)
    c = result.kfac
    assert c.trace == pytest.approx(float(K.trace()), rel=1e-12)
    assert list(c.top) == pytest.approx(torch.linalg.eigvalsh(K).flip(0)[:3].tolist(), rel=1e-10)
    assert list(c.ggn_top) == result.top.eigenvalues.tolist() and c.ggn_trace == result.trace.value
    exact = float((G - K).norm() / G.norm())
    assert abs(c.distance - exact) <= 4 * c.distance_stderr and 0 < c.distance_stderr < 0.3 * exact
    blocks = {"0": slice(0, 30), "2": slice(30, 51)}
    assert [x.name for x in c.layers] == ["0", "2"]
    for x in c.layers:
        b = blocks[x.name]
        assert x.trace == pytest.approx(float(K[b, b].trace()), rel=1e-12)
        assert x.top_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(K[b, b])[-1]), rel=1e-10)
        assert x.ggn_top_eigenvalue == next(layer.top_eigenvalue for layer in result.layers if layer.name == x.name)
    assert result.curvature == "kfac"


def test_the_distance_estimator_is_calibrated_over_seeds():
    """Over 200 seeds the estimate's mean is within 3 standard errors of the truth (ratio bias is
    O(1/n)) and the reported standard error matches the spread of the estimates within 25%."""
    M = torch.randn(12, 12, generator=gen(3), dtype=D)
    G = M @ M.T
    K = G + 0.3 * torch.diag(torch.rand(12, generator=gen(4), dtype=D)) * G.diag().mean()
    exact = float((G - K).norm() / G.norm())
    runs = torch.tensor([frobenius_distance(G, K, 50, seed) for seed in range(200)], dtype=D)
    spread = float(runs[:, 0].std())
    assert abs(float(runs[:, 0].mean()) - exact) <= 3 * spread / math.sqrt(200) + 0.02 * exact
    assert float(runs[:, 1].mean()) == pytest.approx(spread, rel=0.25)


def test_where_kfac_is_exact_the_distance_is_zero():
    X = torch.randn(9, 4, generator=gen(5), dtype=D)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 3)).double()
    data = (X, torch.randn(9, 3, generator=gen(6), dtype=D))
    r = analyze(net, nn.MSELoss(), data, curvature="kfac", top_k=2, bottom_k=0, trace_matvecs=45, slq_probes=1,
                slq_steps=5, landscape=False)
    assert r.kfac.distance < 1e-7 and r.kfac.trace == pytest.approx(r.trace.value, rel=1e-9)  # Hutch++ sketch of rank P: exact


def test_top_eigenvalues_of_given_factors():
    A, S = torch.diag(torch.tensor([1.0, 3.0], dtype=D)), torch.diag(torch.tensor([2.0, 5.0, 0.5], dtype=D))
    op = KFACOperator.from_factors([torch.zeros(3, 2, dtype=D)], [KroneckerFactors("l", 0, None, A=A, S=S)],
                                   (Block("l", 0, 6, ("weight",)),))
    assert top_eigenvalues(op, 3).tolist() == [15.0, 6.0, 5.0]


def test_report_json_and_refusals(problem, result, tmp_path):
    assert HessianAnalysis.from_json(result.to_json()) == result
    assert HessianAnalysis.from_json(result.to_json()).kfac is not None
    text = summary_table(result)
    assert "K-FAC against the Gauss-Newton matrix" in text and "‖G − K‖_F / ‖G‖_F" in text
    write_report(result, tmp_path / "r", context={})
    assert "K-FAC per layer" in (tmp_path / "r" / "report.md").read_text()
    model, data, loss = problem
    with pytest.raises(ValueError, match="kfac_probes must be >= 2"):
        analyze(model, loss, data, curvature="kfac", kfac_probes=1)
    normed = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match=r"1\.weight \(LayerNorm\)"):
        analyze(normed, loss, data, curvature="kfac")
