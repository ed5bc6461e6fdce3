"""Fake quantizers (HAWQ-V3 symmetric weights, Q-BERT groups, asymmetric activations) against hand
computations, and the layer wrappers against the plain modules run with hand-quantized weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.quant.quantizers import (
    ActivationQuantizer,
    QuantizedLayer,
    fake_quantize,
    quantizable_layers,
    quantization_error,
    quantize_weight,
    symmetric_scale,
    wrap_layers,
)

D = torch.float64


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Layer constructors draw from the global RNG; give it back as it was."""
    with torch.random.fork_rng(devices=[]):
        yield


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Reproducible float64 normals without touching the global RNG."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def hand_quantize(w: torch.Tensor, bits: int, amax: torch.Tensor) -> torch.Tensor:
    """s * clamp(round(w / s), -2^(b-1), 2^(b-1)-1) with s = amax / (2^(b-1)-1)."""
    qmax = 2 ** (bits - 1) - 1
    s = amax / qmax
    return s * torch.clamp(torch.round(w / s), -qmax - 1, qmax)


# ----------------------------------------------------------------------------- weights


def test_ramp_has_at_most_2_to_b_levels_on_the_grid():
    w = torch.linspace(-1.3, 0.9, 1001, dtype=D)
    s = symmetric_scale(w, 3, "tensor")
    assert s.shape == (1,) and s.item() == pytest.approx(1.3 / 3, rel=1e-15)
    levels = torch.unique(quantize_weight(w, 3, "tensor"))
    assert len(levels) <= 2 ** 3
    codes = levels / s
    torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-12)
    assert codes.min() >= -4 and codes.max() <= 3


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_error_at_most_half_a_step(granularity):
    w = randn(6, 5, 3)
    for bits in (2, 4, 8):
        s = symmetric_scale(w, bits, granularity)
        err = (quantize_weight(w, bits, granularity) - w).abs()
        assert torch.all(err <= s / 2 * (1 + 1e-12))


def test_channel_scale_is_row_absmax_over_levels():
    w = randn(4, 7)
    torch.testing.assert_close(symmetric_scale(w, 4), w.abs().amax(dim=1, keepdim=True) / 7, rtol=0, atol=0)
    conv = randn(5, 3, 2, 2, seed=1)
    s = symmetric_scale(conv, 8)
    assert s.shape == (5, 1, 1, 1)
    torch.testing.assert_close(s.flatten(), conv.abs().flatten(1).amax(dim=1) / 127, rtol=0, atol=0)
    assert symmetric_scale(conv, 8, "tensor").shape == (1, 1, 1, 1)


def test_group_scales_and_indivisible_rows():
    w = randn(6, 4)
    s = symmetric_scale(w, 3, "group", group_size=2)
    assert s.shape == (6, 1)
    group_max = w.abs().reshape(3, 8).amax(dim=1).repeat_interleave(2)
    torch.testing.assert_close(s.flatten(), group_max / 3, rtol=0, atol=0)
    torch.testing.assert_close(quantize_weight(w, 3, "group", 2), hand_quantize(w, 3, group_max[:, None]))
    with pytest.raises(ValueError, match=r"does not divide the 6 rows.*\(6, 4\)"):
        symmetric_scale(w, 3, "group", group_size=4)
    with pytest.raises(ValueError, match="needs group_size"):
        symmetric_scale(w, 3, "group")
    with pytest.raises(ValueError, match="only to granularity='group'"):
        symmetric_scale(w, 3, "channel", group_size=2)


@pytest.mark.parametrize("granularity, group_size", [("tensor", None), ("channel", None), ("group", 3)])
def test_idempotent(granularity, group_size):
    w = randn(6, 9, seed=2)
    once = quantize_weight(w, 3, granularity, group_size)
    torch.testing.assert_close(quantize_weight(once, 3, granularity, group_size), once)


def test_error_decreases_with_bits():
    w = randn(8, 16, seed=3).float()
    errors = [quantization_error(w, b) for b in (2, 3, 4, 8)]
    assert all(isinstance(e, float) for e in errors)
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4
    w64 = w.double()
    hand = hand_quantize(w64, 3, w64.abs().amax(1, keepdim=True))
    assert errors[1] == pytest.approx(((hand - w64) ** 2).sum().item())
    assert quantization_error(w, 32) < 1e-12


def test_zero_slice_stays_zero():
    w = randn(3, 4)
    w[1] = 0
    for granularity in ("channel", "tensor"):
        q = quantize_weight(w, 4, granularity)
        assert torch.isfinite(q).all() and torch.equal(q[1], torch.zeros(4, dtype=D))
    assert torch.equal(quantize_weight(torch.zeros(2, 3), 2), torch.zeros(2, 3))
    assert symmetric_scale(torch.zeros(2, 3), 2).eq(1).all()


def test_dtype_shape_and_bad_bits():
    w = randn(3, 4).half()
    assert quantize_weight(w, 4).dtype == torch.float16 and quantize_weight(w, 4).shape == (3, 4)
    for bad in (1, 0, 33, 3.0, True, None):
        with pytest.raises(ValueError, match=r"2\.\.32"):
            quantize_weight(w, bad)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_weight(torch.ones(2, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize_weight(w, 4, "row")


# ----------------------------------------------------------------------------- STE


def test_fake_quantize_forward_and_strict_ste_gradient():
    # s = 0.5, z = 2, codes 0..7: x/s + z inside [0, 7] iff x in [-1, 2.5] (up to rounding).
    x = torch.tensor([-3.0, -1.5, -1.2, -1.0, -0.3, 0.0, 0.7, 2.5, 2.7, 3.0, 9.0], dtype=D, requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.5, dtype=D), 2.0, 0, 7)
    expected = torch.tensor([-1.0, -1.0, -1.0, -1.0, -0.5, 0.0, 0.5, 2.5, 2.5, 2.5, 2.5], dtype=D)
    assert torch.equal(y.detach(), expected)
    upstream = torch.arange(1.0, 12.0, dtype=D)
    y.backward(upstream)
    # round(-1.2/0.5 + 2) = round(-0.4) = -0 is still inside, round(2.7/0.5 + 2) = 7 as well;
    # -1.5 and 3.0 land one code outside (-1 and 8).
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=D)
    assert torch.equal(x.grad, inside * upstream)


def test_ste_under_torch_func_and_weight_gradient_is_identity():
    x = torch.tensor([-2.0, 0.1, 0.4, 3.0], dtype=D)
    g = torch.func.grad(lambda t: fake_quantize(t, torch.tensor(0.25, dtype=D), 0.0, -4, 3).sum())(x)
    assert torch.equal(g, torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=D))
    w = randn(3, 5).requires_grad_()
    quantize_weight(w, 2).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_fake_quantize_bad_arguments():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="qmin < qmax"):
        fake_quantize(x, torch.tensor(1.0), 0.0, 3, 3)
    with pytest.raises(ValueError, match="broadcast"):
        fake_quantize(x, torch.ones(2, 3), 0.0, 0, 3)


# ----------------------------------------------------------------------------- activations


def test_activation_range_ema_and_eval_mode():
    q = ActivationQuantizer(bits=4, momentum=0.9).double()
    batches = [torch.tensor([-1.0, 2.0], dtype=D), torch.tensor([0.5, 4.0], dtype=D),
               torch.tensor([-3.0, 1.0], dtype=D)]
    lo, hi = -1.0, 2.0  # the first batch sets the range
    lo, hi = 0.9 * lo + 0.1 * 0.0, 0.9 * hi + 0.1 * 4.0  # min 0.5 widened to 0
    lo, hi = 0.9 * lo + 0.1 * -3.0, 0.9 * hi + 0.1 * 1.0
    for x in batches:
        out = q(x)
    assert q.running_min.item() == pytest.approx(lo, abs=1e-15) and q.running_max.item() == pytest.approx(hi)
    s = (hi - lo) / 15
    z = round(-lo / s)
    expected = s * (torch.clamp(torch.round(batches[-1] / s + z), 0, 15) - z)
    torch.testing.assert_close(out, expected)
    q.eval()
    before = (q.running_min.clone(), q.running_max.clone())
    q(torch.tensor([-50.0, 50.0], dtype=D))
    assert torch.equal(q.running_min, before[0]) and torch.equal(q.running_max, before[1])
    assert q(torch.zeros(3, dtype=D)).eq(0).all()


def test_activation_plain_min_max_and_identity():
    q = ActivationQuantizer(bits=8, momentum=-1)
    for x in ([0.5, 2.0], [0.2, 1.0], [1.0, 3.0]):
        q(torch.tensor(x))
    assert q.running_min.item() == 0.0 and q.running_max.item() == 3.0  # ReLU-like input: min clamped to 0
    ident = ActivationQuantizer(bits=None)
    x = torch.tensor([0.1234, -5.0])
    assert ident(x) is x and not ident.initialized
    with pytest.raises(RuntimeError, match="no range yet"):
        ActivationQuantizer(4).eval()(x)
    with pytest.raises(ValueError, match="momentum"):
        ActivationQuantizer(4, momentum=1.5)
    with pytest.raises(ValueError, match=r"1\.\.32"):
        ActivationQuantizer(0)


def test_activation_state_dict_round_trip():
    q = ActivationQuantizer(bits=3)
    q(torch.tensor([-0.7, 1.9]))
    q(torch.tensor([-0.2, 2.4]))
    fresh = ActivationQuantizer(bits=3)
    fresh.load_state_dict(q.state_dict())
    q.eval(), fresh.eval()
    x = torch.linspace(-1, 3, 17)
    assert bool(fresh.initialized) and torch.equal(fresh(x), q(x))
    assert set(q.state_dict()) == {"running_min", "running_max", "initialized"}


# ----------------------------------------------------------------------------- layers


def make_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch_gen = torch.Generator().manual_seed(5)
    if kind == "linear":
        layer, x = nn.Linear(6, 4), torch.randn(3, 6, generator=torch_gen)
    elif kind == "conv1d":
        layer, x = nn.Conv1d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 9, generator=torch_gen)
    else:
        layer, x = nn.Conv2d(2, 4, 3, padding=1, dilation=2), torch.randn(2, 2, 6, 6, generator=torch_gen)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen))
    return layer.double(), x.double()


def plain(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_quantized_layer_equals_module_with_hand_quantized_weight(kind):
    layer, x = make_layer(kind)
    w = layer.weight.detach()
    w_q = hand_quantize(w, 3, w.abs().flatten(1).amax(dim=1).reshape([-1] + [1] * (w.ndim - 1)))
    wrapped = QuantizedLayer(layer, weight_bits=3)
    assert torch.equal(wrapped(x), plain(layer, x, w_q))
    assert not torch.equal(wrapped(x), layer(x))
    wrapped.weight_bits = None
    assert torch.equal(wrapped(x), layer(x))


def test_quantized_layer_with_activation_bits_and_groups():
    layer, x = make_layer("linear")
    wrapped = QuantizedLayer(layer, 4, act_bits=5, granularity="group", group_size=2)
    out = wrapped(x)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    s = (hi - lo) / 31
    z = round(-lo / s)
    x_q = s * (torch.clamp(torch.round(x / s + z), 0, 31) - z)
    w = layer.weight.detach()
    w_q = hand_quantize(w, 4, w.abs().reshape(2, -1).amax(1).repeat_interleave(2)[:, None])
    torch.testing.assert_close(out, F.linear(x_q, w_q, layer.bias), rtol=1e-14, atol=1e-14)
    assert wrapped.act_bits == 5 and wrapped.granularity == "group" and wrapped.group_size == 2


def test_gradient_reaches_the_real_weight():
    layer, x = make_layer("conv2d")
    wrapped = QuantizedLayer(layer, weight_bits=2)
    wrapped(x).square().sum().backward()
    w_q = quantize_weight(layer.weight.detach(), 2).requires_grad_()
    plain(layer, x, w_q).square().sum().backward()
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, w_q.grad)


def test_quantized_layer_rejects_modules_without_weight():
    with pytest.raises(TypeError, match="ReLU has no weight"):
        QuantizedLayer(nn.ReLU(), 4)
    with pytest.raises(TypeError, match="already a QuantizedLayer"):
        QuantizedLayer(QuantizedLayer(nn.Linear(2, 2), 4), 4)
    with pytest.raises(ValueError, match="weight_bits"):
        QuantizedLayer(nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        QuantizedLayer(nn.Linear(2, 4), 4, granularity="group", group_size=3)


# ----------------------------------------------------------------------------- models


class Bilinear(nn.Module):
    """A custom layer owning a 2-D weight and a 1-D scale."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(7)))
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * (x @ self.weight.T)


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Sequential(Bilinear(), nn.ReLU(), nn.Linear(3, 2)))


def test_quantizable_layers():
    model = small_model()
    names = [name for name, _ in quantizable_layers(model)]
    assert names == ["0", "2.0", "2.2"]
    wrapped = wrap_layers(model, {"2.0": 4})
    layers = quantizable_layers(wrapped)
    assert [name for name, _ in layers] == names
    assert layers[1][1] is wrapped[2][0].module and isinstance(layers[1][1], Bilinear)


def test_wrap_layers_copies_and_matches_hand_quantization():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    wrapped = wrap_layers(model, {"0": 3, "2.0": 4, "2.2": None}, act_bits={"2.2": 8})
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(8))
    out = wrapped(x)
    assert torch.equal(torch.get_rng_state(), rng)
    wrapped[2][2].act_quantizer.eval()  # the range the training-mode call set from this batch
    assert [type(m) for m in model.modules()] == [type(m) for m in small_model().modules()]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(wrapped[0], QuantizedLayer) and isinstance(wrapped[2][2], QuantizedLayer)
    assert wrapped[2][2].weight_bits is None and wrapped[2][2].act_bits == 8 and wrapped[0].act_bits is None
    torch.testing.assert_close(out, model[2][2](wrapped[2][2].act_quantizer(wrapped[2][1](wrapped[2][0](
        wrapped[1](F.linear(x, quantize_weight(model[0].weight, 3), model[0].bias)))))), rtol=0, atol=0)
    rewrapped = wrap_layers(wrapped, {"2.2": 2}, inplace=True)
    assert rewrapped is wrapped and wrapped[2][2].weight_bits == 2 and isinstance(wrapped[2][2].module, nn.Linear)
    assert bool(wrapped[2][2].act_quantizer.initialized)  # the tracked range survives reconfiguration


def test_wrap_layers_rejects_unknown_names_and_keeps_the_model():
    model = small_model()
    with pytest.raises(ValueError, match=r"\['1', 'fc'\].*valid names: \['0', '2.0', '2.2'\]"):
        wrap_layers(model, {"0": 4, "1": 4, "fc": 4}, inplace=True)
    with pytest.raises(ValueError, match="not in bits"):
        wrap_layers(model, {"0": 4}, act_bits={"2.2": 8}, inplace=True)
    with pytest.raises(ValueError, match="does not divide"):
        wrap_layers(model, {"0": 4, "2.2": 4}, granularity="group", group_size=3, inplace=True)
    assert not any(isinstance(m, QuantizedLayer) for m in model.modules())
    root = wrap_layers(nn.Linear(3, 3), {"": 4})
    assert isinstance(root, QuantizedLayer)
