"""HAWQ / Q-BERT sensitivities against exact Hessian blocks; PTQ and QAT leave the caller's model alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.quant.qat import finetune, quantize
from secondorder.quant.quantizers import QuantizedLayer, quantization_error
from secondorder.quant.sensitivity import hawq_v1, hawq_v2, layer_sensitivities, qbert
from tests.references import dense_hessian, tiny_mlp_problem


def problem(seed: int = 0):
    return tiny_mlp_problem(seed, 48, 24)


def test_layer_sensitivities_match_exact_weight_blocks():
    model, data = problem()
    H = dense_hessian(model, F.cross_entropy, data, ["0.weight", "2.weight"])
    blocks = {"0": H[:24, :24], "2": H[24:, 24:]}
    s = layer_sensitivities(model, F.cross_entropy, data, bits=(2, 4, 8), trace_matvecs=60, seed=0)
    assert [x.name for x in s.layers] == ["0", "2"] and s.sizes() == {"0": 24, "2": 18}
    for x in s.layers:
        exact = blocks[x.name]
        assert abs(x.top_eigenvalue - float(torch.linalg.eigvalsh(exact)[-1])) <= x.top_residual + 1e-10
        assert abs(x.trace - float(exact.trace())) <= 4 * x.trace_stderr + 1e-9
        w = dict(model.named_modules())[x.name].weight.detach()
        assert x.errors == {b: quantization_error(w, b, "channel", None) for b in (2, 4, 8)}
        assert x.errors[2] > x.errors[4] > x.errors[8] > 0
    v2, v1, eig, raw = s.hawq_v2(), s.hawq_v1(), s.eigenvalue_weighted(), s.unweighted()
    for x in s.layers:
        assert v2[x.name][4] == pytest.approx(x.trace / x.size * x.errors[4])
        assert v1[x.name] == pytest.approx(x.top_eigenvalue / x.size)
        assert eig[x.name][2] == pytest.approx(x.top_eigenvalue * x.errors[2]) and raw[x.name] == x.errors
    assert hawq_v2(model, F.cross_entropy, data, bits=(2, 4, 8), trace_matvecs=60, seed=0) == v2
    assert hawq_v1(model, F.cross_entropy, data, trace_matvecs=60, seed=0) == v1


def test_traces_without_top_eigenvalues_are_the_same_traces():
    model, data = problem()
    full = layer_sensitivities(model, F.cross_entropy, data, bits=(2, 4), trace_matvecs=30, seed=3)
    lean = layer_sensitivities(model, F.cross_entropy, data, bits=(2, 4), trace_matvecs=30, seed=3,
                               top_eigenvalues=False)
    assert [(x.name, x.size, x.trace, x.trace_stderr, x.errors) for x in lean.layers] == [
        (x.name, x.size, x.trace, x.trace_stderr, x.errors) for x in full.layers]
    assert lean.hawq_v2() == full.hawq_v2() and lean.num_matvecs == 30 < full.num_matvecs
    assert all(x.top_eigenvalue != x.top_eigenvalue for x in lean.layers)  # NaN
    for method in (lean.hawq_v1, lean.eigenvalue_weighted):
        with pytest.raises(ValueError, match="top_eigenvalues=True"):
            method()


def test_qbert_mean_and_std_over_batches():
    model, data = problem(1)
    got = qbert(model, F.cross_entropy, data, seed=0)
    for name, sl in (("0", slice(0, 24)), ("2", slice(24, 42))):
        tops = [float(torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, [b], ["0.weight", "2.weight"])
                                            [sl, sl])[-1]) for b in data]
        mean, std = sum(tops) / 2, abs(tops[0] - tops[1]) / 2 ** 0.5
        assert got[name][0] == pytest.approx(mean, rel=1e-6) and got[name][1] == pytest.approx(std, rel=1e-5, abs=1e-9)
        assert got[name][2] == pytest.approx(abs(mean) + std, rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 batches"):
        qbert(model, F.cross_entropy, data[0])


def test_bad_input_says_what_is_feasible():
    model, data = problem()
    with pytest.raises(ValueError, match=r"quantizable layers are \['0', '2'\]"):
        layer_sensitivities(model, F.cross_entropy, data, layers=["0", "fc"])
    with pytest.raises(ValueError, match="1..32"):
        layer_sensitivities(model, F.cross_entropy, data, bits=(0, 4))
    with pytest.raises(ValueError, match="no quantizable layers"):
        layer_sensitivities(nn.Sequential(nn.Tanh()), F.cross_entropy, data)


def test_ptq_copy_and_qat_stages():
    model, data = problem(2)
    before = copy.deepcopy(model.state_dict())
    q = quantize(model, {"0": 3, "2": 2})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(q[0], QuantizedLayer) and not isinstance(model[0], QuantizedLayer)
    X, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        start = float(F.cross_entropy(q(X), y))
        assert layer_sensitivities(q, F.cross_entropy, data, bits=(3,), trace_matvecs=9).sizes() == {"0": 24, "2": 18}
    q.eval()
    losses = finetune(q, F.cross_entropy, data, epochs=20, lr=0.05, order=["2", "0"], freeze_quantized=True)
    assert not q.training and len(losses) == 2 * 20 * 2
    assert q[0].weight_bits == 3 and q[2].weight_bits == 2
    assert all(p.requires_grad for p in q.parameters())
    assert float(F.cross_entropy(q(X), y).detach()) < start
    with pytest.raises(ValueError, match="not quantized layers"):
        finetune(q, F.cross_entropy, data, order=["1"])
    with pytest.raises(ValueError, match="no quantized layers"):
        finetune(model, F.cross_entropy, data)
