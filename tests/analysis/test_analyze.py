"""`analyze` against the exact Hessian of a tiny model; JSON round trip; the model left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from secondorder.analysis import HessianAnalysis, analyze
from tests.cases import tiny_problem
from tests.references import dense_hessian


@pytest.fixture(scope="module")
def exact():
    model, data = tiny_problem()
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, F.cross_entropy, data, names)
    X = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    loss = F.cross_entropy(model(X[0]), X[1])
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    return model, data, H, float(loss.detach()), grad


@pytest.fixture(scope="module")
def result(exact):
    model, data = exact[0], exact[1]
    return analyze(model, F.cross_entropy, data, top_k=3, bottom_k=2, trace_matvecs=30, slq_probes=3, slq_steps=20,
                   landscape_points=5, landscape_grid=3, seed=0)


def test_numbers_match_the_exact_hessian_within_reported_errors(exact, result):
    model, data, H, loss, grad = exact
    lam = torch.linalg.eigvalsh(H)
    assert result.num_parameters == H.shape[0] == 51 and result.num_samples == 32
    assert result.loss == pytest.approx(loss, rel=1e-12)
    assert result.gradient_norm == pytest.approx(float(grad.norm()), rel=1e-10)
    for got, want, res in zip(result.top.eigenvalues.tolist(), lam.flip(0)[:3].tolist(), result.top.residuals.tolist()):
        assert abs(got - want) <= res + 1e-10 and res < 1e-6
    for got, want, res in zip(result.bottom.eigenvalues.tolist(), lam[:2].tolist(), result.bottom.residuals.tolist()):
        assert abs(got - want) <= res + 1e-10
    t = result.trace
    low, high = t.confidence_interval(0.95)
    assert abs(t.value - float(H.trace())) <= 4 * t.stderr + 1e-9 and low <= t.value <= high
    blocks = {"0": H[:30, :30], "2": H[30:, 30:]}  # Linear(4,6): 24 + 6 coordinates, then Linear(6,3)
    assert [layer.name for layer in result.layers] == ["0", "2"]
    assert sum(layer.trace for layer in result.layers) == pytest.approx(t.value, rel=1e-9)
    for layer in result.layers:
        block = blocks[layer.name]
        assert abs(layer.top_eigenvalue - float(torch.linalg.eigvalsh(block)[-1])) <= layer.top_residual + 1e-10
        assert abs(layer.trace - float(block.trace())) <= 5 * layer.trace_stderr + 1e-9
        assert layer.trace_per_parameter == pytest.approx(layer.trace / layer.size)


def test_landscape_curvature_is_the_top_eigenvalue(exact):
    model, data, H, loss, _ = exact
    r = analyze(model, F.cross_entropy, data, top_k=2, bottom_k=0, trace_matvecs=9, slq_probes=1, slq_steps=5,
                landscape_radius=1e-3, landscape_points=7, landscape_grid=3, seed=1)
    land = r.landscape_1d
    assert land.names == ("top eigenvector", "random")
    assert land.losses[0][3] == pytest.approx(loss, rel=1e-12)  # alpha = 0
    assert land.sharpness("top eigenvector") == pytest.approx(float(r.top.eigenvalues[0]), rel=1e-3)
    lam = torch.linalg.eigvalsh(H)
    assert lam[0] - 1e-6 <= land.sharpness("random") <= lam[-1] + 1e-6
    assert r.landscape_2d.losses[1][1] == pytest.approx(loss, rel=1e-12)


def test_json_round_trip(result, tmp_path):
    again = HessianAnalysis.from_json(result.to_json())
    assert again == result
    result.save(tmp_path / "a.json")
    assert HessianAnalysis.load(tmp_path / "a.json") == result
    assert isinstance(again.layers[0].name, str) and torch.equal(again.top.eigenvalues, result.top.eigenvalues)
    assert again.top.eigenvectors.shape == (0, 3)  # the report keeps no P x k eigenvectors


def test_model_mode_parameters_and_rng_untouched():
    model, data = tiny_problem(1)
    model.train()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    analyze(model, F.cross_entropy, data, top_k=1, bottom_k=0, trace_matvecs=6, slq_probes=1, slq_steps=4,
            landscape_points=3, landscape_grid=3)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_parameters_restored_when_the_landscape_fails():
    model, data = tiny_problem(2)
    before = copy.deepcopy(model.state_dict())
    w0 = model[0].weight.detach().clone()

    def flaky(outputs, targets):
        if not torch.equal(model[0].weight, w0):  # only while the landscape has shifted the parameters
            raise RuntimeError("boom")
        return F.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="boom"):
        analyze(model, flaky, data, top_k=1, bottom_k=0, trace_matvecs=6, slq_probes=1, slq_steps=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(curvature="fisher"), "curvature"), (dict(top_k=0), "top_k"), (dict(bottom_k=-1), "bottom_k"),
    (dict(top_k=51), "below the number of parameters"),
])
def test_bad_arguments(kwargs, match):
    model, data = tiny_problem()
    with pytest.raises(ValueError, match=match):
        analyze(model, F.cross_entropy, data, **kwargs)


def test_a_report_in_the_former_layout_still_loads():
    """summary.json files written before the linalg results were embedded ('values', 'ci95')."""
    import json
    from pathlib import Path

    old = json.loads((Path(__file__).parent / "data" / "analysis_former_layout.json").read_text())
    a = HessianAnalysis.from_dict(old)
    assert a.top.eigenvalues.tolist() == old["top"]["values"] and a.top.converged.tolist() == old["top"]["converged"]
    assert a.bottom.residuals.tolist() == old["bottom"]["residuals"]
    assert a.density.nodes.tolist() == old["density"]["nodes"] and a.density.dimension == old["density"]["dimension"]
    assert a.trace.value == old["trace"]["value"] and [b.value for b in a.trace.blocks] == [x["trace"] for x in old["layers"]]
    low, high = a.trace.confidence_interval()
    assert low < a.trace.value < high
    assert HessianAnalysis.from_json(a.to_json()) == a
