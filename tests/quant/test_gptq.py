"""GPTQ: an independent one-column-at-a-time OBS reference, errors against round-to-nearest, the grid, singular
Hessians, im2col Hessians, sequential processing, and bad input that leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from secondorder.quant import gptq_quantize, gptq_round, layer_hessians, quantize_weight
from secondorder.quant.quantizers import symmetric_scale

D = torch.float64


def correlated(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols, dtype=D) + 0.6 * torch.randn(cols, cols, generator=g, dtype=D)
    return torch.randn(n, cols, generator=g, dtype=D) @ mix


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


def obs_reference(w, h, bits, granularity="channel", group_size=None, act_order=False, percdamp=0.01):
    """Optimal Brain Quantizer with a dense inverse Hessian, one column at a time (no Cholesky, no blocks)."""
    w, h = w.clone().to(D), h.clone().to(D)
    rows, cols = w.shape
    qmax = 2 ** (bits - 1) - 1
    original = w.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = torch.linalg.inv(h + percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=D))
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist() if act_order else list(range(cols))
    if granularity == "column_group":
        scale = torch.ones(rows, cols, dtype=D)
    else:
        scale = symmetric_scale(original, bits, granularity, group_size).reshape(-1, 1).expand(rows, cols).clone()
    out = torch.zeros(rows, cols, dtype=D)
    remaining = list(order)
    for pos, j in enumerate(order):
        if granularity == "column_group" and pos % group_size == 0:
            group = order[pos:pos + group_size]
            amax = w[:, group].abs().amax(dim=1)
            scale[:, group] = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).unsqueeze(1)
        out[:, j] = scale[:, j] * torch.round(w[:, j] / scale[:, j]).clamp(-qmax - 1, qmax)
        err = (w[:, j] - out[:, j]) / hinv[j, j]
        remaining.remove(j)
        w[:, remaining] -= err.unsqueeze(1) * hinv[j, remaining].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return out


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity, group_size", [("channel", None), ("tensor", None), ("group", 2),
                                                     ("column_group", 3)])
def test_equals_the_column_by_column_obs_reference(act_order, granularity, group_size):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 10, generator=g, dtype=D)
    h = hessian_of(correlated(40, 10, seed=4))
    r = gptq_round(w, h, 3, granularity, group_size, act_order=act_order, block_size=4)  # blocks 4 + 4 + 2
    want = obs_reference(w, h, 3, granularity, group_size, act_order)
    torch.testing.assert_close(r.weight, want, rtol=0, atol=1e-10)
    assert not torch.equal(r.weight, quantize_weight(w, 3, "channel"))  # it did more than round to nearest
    assert r.damping_raises == 0 and r.dead_inputs == 0
    assert r.damping == pytest.approx(0.01 * float(torch.diagonal(h).mean()), rel=1e-14)


def test_output_error_below_round_to_nearest():
    gptq, nearest = [], []
    for seed in range(6):
        x = correlated(128, 32, seed)
        w = torch.randn(8, 32, generator=torch.Generator().manual_seed(100 + seed), dtype=D)
        h = hessian_of(x)
        for bits, act_order in ((4, False), (3, True)):
            r = gptq_round(w, h, bits, act_order=act_order, block_size=8)
            # the reported errors are the layer's output errors (2/n) ||(W - W_hat) X^T||^2
            assert r.error == pytest.approx(2 / 128 * float(((w - r.weight) @ x.T).square().sum()), rel=1e-10)
            rtn = quantize_weight(w, bits)
            assert r.nearest_error == pytest.approx(2 / 128 * float(((w - rtn) @ x.T).square().sum()), rel=1e-10)
            assert r.error <= r.nearest_error, (seed, bits)
            gptq.append(r.error)
            nearest.append(r.nearest_error)
    assert sum(gptq) < 0.9 * sum(nearest)


@pytest.mark.parametrize("granularity, group_size", [("channel", None), ("tensor", None), ("group", 4)])
def test_on_the_round_to_nearest_grid(granularity, group_size):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 3, 2, 2, generator=g)  # float32, a conv-shaped weight: 12 columns
    h = hessian_of(correlated(64, 12, seed=6)).float()
    r = gptq_round(w, h, 3, granularity, group_size, act_order=True, block_size=5)
    s = symmetric_scale(w, 3, granularity, group_size)
    codes = torch.round(r.weight / s)
    assert r.weight.dtype == torch.float32 and r.weight.shape == w.shape
    assert torch.equal(r.weight, s * codes) and codes.min() >= -4 and codes.max() <= 3
    assert torch.equal(r.scale, s.expand_as(w))
    rtn = quantize_weight(w, 3, granularity, group_size)
    assert torch.equal(rtn, s * torch.round(rtn / s))  # the same grid, other points
    assert 0 < (rtn != r.weight).float().mean() < 1


def test_column_groups_are_on_their_grid():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(5, 11, generator=g)
    r = gptq_round(w, hessian_of(correlated(50, 11, seed=8)), 4, "column_group", 4, block_size=3)
    codes = torch.round(r.weight / r.scale)
    assert torch.equal(r.weight, r.scale * codes) and codes.min() >= -8 and codes.max() <= 7
    for start in range(0, 11, 4):  # one scale per row and group of 4 columns (the last group has 3)
        block = r.scale[:, start:start + 4]
        assert torch.equal(block, block[:, :1].expand_as(block))
    assert r.error <= r.nearest_error


def test_singular_hessian_with_duplicate_and_dead_inputs():
    x = correlated(5, 8, seed=9)  # 5 input vectors for 8 columns: rank <= 5
    x[:, 3] = x[:, 1]
    x[:, 5] = 0.0
    h = hessian_of(x)
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(10), dtype=D)
    for percdamp in (0.01, 1e-20):
        r = gptq_round(w, h, 3, percdamp=percdamp, block_size=3)
        assert r.dead_inputs == 1 and torch.equal(r.weight[:, 5], torch.zeros(4, dtype=D))
        assert torch.isfinite(r.weight).all() and r.error <= r.nearest_error
        mean = float(torch.diagonal(h).mean()) + 1 / 8  # the dead input's diagonal counts as 1
        assert r.relative_damping == pytest.approx(percdamp * 10.0 ** r.damping_raises, rel=1e-12)
        assert r.damping == pytest.approx(r.relative_damping * mean, rel=1e-12)
        torch.testing.assert_close(r.weight, obs_reference(w, h, 3, percdamp=r.relative_damping), rtol=0, atol=1e-9)
    assert r.damping_raises > 0  # a damping of 1e-20 * mean(diag H) does not make the singular H factorisable


def test_indefinite_hessian_raises_the_damping():
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=D)  # eigenvalues 4 and -2: needs damping > 2
    w = torch.tensor([[0.3, -0.7], [1.0, 0.2]], dtype=D)
    r = gptq_round(w, h, 4)
    assert r.damping_raises == 3 and r.damping == pytest.approx(10.0, rel=1e-14)
    with pytest.raises(RuntimeError, match="max_damping_raises"):
        gptq_round(w, h, 4, max_damping_raises=2)


def test_im2col_hessians():
    torch.manual_seed(0)
    conv2 = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)).double()
    conv1 = nn.Conv1d(2, 3, 4, padding="same", padding_mode="circular").double()
    lin = nn.Linear(5, 2).double()
    xs2 = [torch.randn(b, 3, 7, 6, dtype=D) for b in (2, 3)]
    xs1 = [torch.randn(b, 2, 9, dtype=D) for b in (2, 3)]
    xsl = [torch.randn(b, 4, 5, dtype=D) for b in (2, 3)]  # tokens: one row per (sample, position)
    h = layer_hessians(conv2, [(x, None) for x in xs2], [""])[""]
    rows = torch.cat([F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1)).transpose(1, 2)
                      .reshape(-1, 18) for x in xs2])
    torch.testing.assert_close(h, hessian_of(rows), rtol=1e-13, atol=1e-13)
    # Conv1d (circular 'same' padding): the patches are the Jacobian of output channel 0 with respect to filter 0
    def channel0(filt, x):
        weight = torch.cat([filt.unsqueeze(0), conv1.weight[1:].detach()])
        return functional_call(conv1, {"weight": weight, "bias": torch.zeros(3, dtype=D)}, (x,))[:, 0].flatten()
    jac = torch.cat([jacrev(channel0)(conv1.weight[0].detach(), x).reshape(-1, 8) for x in xs1])
    torch.testing.assert_close(layer_hessians(conv1, [(x, None) for x in xs1], [""])[""], hessian_of(jac),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer_hessians(lin, xsl[0], [""])[""], hessian_of(xsl[0].reshape(-1, 5)),
                               rtol=1e-13, atol=1e-13)


def small_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(24, 3))


def calibration():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(b, 2, 6, generator=g), torch.zeros(b, dtype=torch.long)) for b in (7, 9)]


@pytest.mark.parametrize("sequential", [True, False])
def test_model_untouched_and_layers_in_sequence(sequential):
    model, data = small_model().train(), calibration()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    res = gptq_quantize(model, {"4": 3, "0": 4}, data, block_size=8, sequential=sequential)
    assert torch.equal(torch.get_rng_state(), rng) and model.training and model[2].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert res.model is not model and res.model.training and res.model[2].training and res.sequential == sequential
    assert list(res.layers) == ["0", "4"]  # execution order, not the order of bits
    manual = copy.deepcopy(model)
    hessians = layer_hessians(manual, data, ["0", "4"])
    for name, bits in (("0", 4), ("4", 3)):
        h = layer_hessians(manual, data, [name])[name] if sequential else hessians[name]
        r = gptq_round(manual.get_submodule(name).weight, h, bits, block_size=8)
        with torch.no_grad():
            manual.get_submodule(name).weight.copy_(r.weight)
        assert res.layers[name].error == r.error and res.layers[name].nearest_error == r.nearest_error
        assert res.layers[name].samples == (16 * 6 if name == "0" else 16) and res.layers[name].bits == bits
    for (k, v), (k2, v2) in zip(res.model.state_dict().items(), manual.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    again = gptq_quantize(model, {"0": 4, "4": 3}, data, block_size=8, sequential=sequential, inplace=True)
    assert again.model is model and torch.equal(model[4].weight, res.model[4].weight)


class Flaky(nn.Module):
    """Raises on its third call: after GPTQ has written the first layer's weight."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("flaky")
        return x


def one_batch():
    return [(torch.randn(6, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(6, dtype=torch.long))]


@pytest.mark.parametrize("make, bits, data, kwargs, error, message", [
    (small_model, {"0": 1}, calibration, {}, ValueError, "2..32"),
    (small_model, {"0": 33}, calibration, {}, ValueError, "2..32"),
    (small_model, {"0": 4.0}, calibration, {}, ValueError, "not an integer"),
    (small_model, {"conv": 4}, calibration, {}, ValueError, "not quantizable layers"),
    (small_model, {"0": 4}, lambda: [(torch.randn(3, 5, 6), None)], {}, ValueError, "rejected calibration batch 0"),
    (small_model, {"0": 4}, lambda: [*calibration(), (torch.randn(3, 5), None)], {}, ValueError, "batch 2"),
    (small_model, {"0": 4}, calibration, {"granularity": "group", "group_size": 3}, ValueError, "does not divide"),
    (small_model, {"0": 4}, calibration, {"percdamp": 0.0}, ValueError, "percdamp"),
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.Bilinear(5, 5, 2)), {"1": 4}, one_batch, {}, TypeError, "Bilinear"),
    (lambda: nn.Sequential(nn.Linear(4, 5), Flaky(), nn.Linear(5, 3)), {"0": 4, "2": 4}, one_batch, {},
     ValueError, "flaky"),
])
def test_bad_input_leaves_the_model_untouched(make, bits, data, kwargs, error, message):
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message) as caught:
        gptq_quantize(model, bits, data(), inplace=True, **kwargs)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
