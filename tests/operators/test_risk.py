"""The empirical risk apart from the products; backends declared once; probe_chunk is trace's own."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secondorder
from secondorder.distributed.reducer import LOCAL
from secondorder.operators import GGNOperator, HessianOperator
from secondorder.operators.risk import EmpiricalRisk


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(23, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (23,), generator=g)
    return [(X[i:i + 8], y[i:i + 8]) for i in range(0, 23, 8)]


@pytest.mark.parametrize("train", [True, False])
def test_risk_keeps_mode_buffers_and_global_rng(train):
    model = _model().train(train)
    buffers = [b.clone() for b in model.buffers()]
    risk = EmpiricalRisk(model, F.cross_entropy, _batches(), seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    loss, grad = risk.loss_and_gradient(list(model.parameters()), LOCAL)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training is train and all(m.training is train for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert risk.num_samples == 23 and grad.shape == (sum(p.numel() for p in model.parameters()),)


def test_risk_is_the_size_weighted_mean_loss():
    model = _model().eval()
    batches = _batches()
    loss, _ = EmpiricalRisk(model, F.cross_entropy, batches).loss_and_gradient(list(model.parameters()), LOCAL,
                                                                                gradient=False)
    X, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        assert abs(loss - float(F.cross_entropy(model(X), y))) < 1e-14


def test_operator_and_risk_give_the_same_loss_and_gradient():
    model = _model()
    H = HessianOperator(model, F.cross_entropy, _batches(), seed=5)
    loss, grad = H.loss_and_gradient()
    loss2, grad2 = EmpiricalRisk(model, F.cross_entropy, _batches(), seed=5).loss_and_gradient(H.params, LOCAL)
    assert loss == loss2 and torch.equal(grad, grad2)


@pytest.mark.parametrize("cls, listed", [(HessianOperator, "'auto', 'loop', 'vmap' or 'jvp'"),
                                         (GGNOperator, "'auto', 'loop' or 'vmap'")])
def test_backends_are_validated_in_one_place(cls, listed):
    with pytest.raises(ValueError, match=f"{cls.__name__}: backend must be {listed}, got 'jax'"):
        cls(_model(), F.cross_entropy, _batches(), backend="jax")


def test_ggn_has_no_jvp_backend():
    assert "jvp" not in GGNOperator.backends
    with pytest.raises(ValueError, match="backend must be 'auto', 'loop' or 'vmap', got 'jvp'"):
        GGNOperator(_model(), F.cross_entropy, _batches(), backend="jvp")


@pytest.mark.parametrize("estimate", [secondorder.trace, secondorder.diagonal])
def test_probe_chunk_gives_bitwise_the_unchunked_result(estimate):
    H = HessianOperator(_model().eval(), F.cross_entropy, _batches())
    whole = estimate(H, 11, method="hutchinson", seed=2)
    for chunk in (1, 4, 11, 50):
        chunked = estimate(H, 11, method="hutchinson", seed=2, probe_chunk=chunk)
        if estimate is secondorder.trace:
            assert chunked.value == whole.value and chunked.stderr == whole.stderr
        else:
            torch.testing.assert_close(chunked.value, whole.value, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_probe_chunk_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="probe_chunk"):
        secondorder.trace(torch.eye(3, dtype=torch.float64), 4, method="hutchinson", probe_chunk=bad)


def test_the_operators_chunk_size_no_longer_chunks_the_probes():
    """chunk_size means one thing: probes per vectorized product; it does not change the trace."""
    model = _model().eval()
    a = secondorder.trace(HessianOperator(model, F.cross_entropy, _batches(), chunk_size=2), 9,
                          method="hutchinson", seed=0)
    b = secondorder.trace(HessianOperator(model, F.cross_entropy, _batches()), 9, method="hutchinson", seed=0)
    assert a.value == b.value
