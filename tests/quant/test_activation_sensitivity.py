"""HAWQ-V2 activation sensitivities against exact per-sample Hessians and an independent quantizer; calibration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.quant import ActivationQuantizer, activation_sensitivities, calibrate, quantize
from tests.operators.test_activations import _assert_untouched, _forked, _snapshot, dense_activation_hessian
from tests.references import tiny_mlp_problem

BITS = (2, 4, 8)


def mlp_problem(seed=0):
    """Linear(4, 6) - Tanh - Linear(6, 3), batches of 7 and 5 samples; layer inputs of 4 and 6 entries."""
    model, data = tiny_mlp_problem(seed, 12, 7)
    return model, data, {"0": 4, "2": 6}


def cnn_problem(seed=0):
    """Conv2d(1, 2, 3) - BatchNorm2d (eval) - Tanh - Flatten - Linear(8, 3), batches of 3 and 2 [*, 1, 4, 4] images."""
    model = _forked(seed, lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                                                nn.Linear(8, 3))).eval()
    gen = torch.Generator().manual_seed(seed)
    X, y = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)
    return model, [(X[:3], y[:3]), (X[3:], y[3:])], {"0": 16, "4": 8}


def per_sample_traces(model, data, names):
    """Mean over all samples of each layer's block trace of the per-sample dense Hessian."""
    traces, count = dict.fromkeys(names, 0.0), 0
    for X, y in data:
        for s in range(len(y)):
            H = dense_activation_hessian(model, F.cross_entropy, (X[s : s + 1], y[s : s + 1]), names)
            start = 0
            for n, size in names.items():
                traces[n] += float(H[start : start + size, start : start + size].trace())
                start += size
            count += 1
    return {n: t / count for n, t in traces.items()}


def layer_inputs(model, data, names):
    """Each layer's input over all the data, by hooks of the test's own, concatenated along the batch."""
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
             for n in names]
    with torch.no_grad():
        for X, _ in data:
            model(X)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("problem", [mlp_problem, cnn_problem], ids=["mlp", "cnn"])
def test_traces_exact_with_full_hutchpp(problem):
    model, data, sizes = problem()
    largest = max(len(y) for _, y in data) * sum(sizes.values())
    s = activation_sensitivities(model, F.cross_entropy, data, bits=BITS, trace_matvecs=3 * largest, seed=1)
    exact = per_sample_traces(model, data, sizes)
    assert s.sizes() == sizes and [x.name for x in s.layers] == list(sizes)
    for x in s.layers:  # Hutch++ with a sketch of every direction is exact; the mean per-sample trace
        assert x.trace == pytest.approx(exact[x.name], rel=1e-10) and x.trace_stderr <= 1e-10 * abs(x.trace)


def test_hutchinson_within_its_error_bars():
    model, data, sizes = mlp_problem(1)
    exact = per_sample_traces(model, data, sizes)
    s = activation_sensitivities(model, F.cross_entropy, data, bits=(4,), trace_matvecs=200, method="hutchinson")
    assert s.num_matvecs == 400
    for x in s.layers:
        assert 0 < x.trace_stderr < 0.2 * abs(x.trace)
        assert abs(x.trace - exact[x.name]) <= 4 * x.trace_stderr


def test_errors_ranges_and_omega_match_an_independent_quantizer():
    model, data, sizes = mlp_problem(2)
    s = activation_sensitivities(model, F.cross_entropy, data, bits=BITS, trace_matvecs=30)
    inputs = layer_inputs(model, data, sizes)
    omega = s.hawq_v2()
    for x in s.layers:
        a = inputs[x.name]
        low, high = float(a.min().clamp(max=0).float()), float(a.max().clamp(min=0).float())  # float32 buffers
        assert (x.low, x.high) == (low, high) == s.ranges()[x.name]
        for b in BITS:
            q = ActivationQuantizer(b)
            q.running_min.fill_(low)
            q.running_max.fill_(high)
            q.initialized.fill_(True)
            q.eval()
            assert x.errors[b] == pytest.approx(float((q(a) - a).square().sum()) / 12, rel=1e-12)
            assert omega[x.name][b] == pytest.approx(x.trace / x.size * x.errors[b], rel=1e-15)
        assert x.errors[2] > x.errors[4] > x.errors[8] > 0


def test_model_left_as_it_was():
    model = _forked(0, lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3),
                                             nn.Linear(6, 3)))
    model.train()
    model[4].weight.grad = torch.ones(3, 6, dtype=torch.float64)
    _, data = tiny_mlp_problem(0, 12, 6)
    snap = _snapshot(model)
    first = activation_sensitivities(model, F.cross_entropy, data, bits=(4,), trace_matvecs=12, seed=5)
    _assert_untouched(model, snap)
    assert activation_sensitivities(model, F.cross_entropy, data, bits=(4,), trace_matvecs=12, seed=5) == first


def test_bad_input_one_clear_error_and_the_model_untouched():
    model, data, _ = mlp_problem()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"unknown layers \['fc'\]; quantizable layers are \['0', '2'\]"):
        activation_sensitivities(model, F.cross_entropy, data, layers=["0", "fc"])
    for bits in [(0, 4), (4, 33)]:
        with pytest.raises(ValueError, match=r"bit width \d+ is not an integer in 1\.\.32"):
            activation_sensitivities(model, F.cross_entropy, data, bits=bits)
    with pytest.raises(ValueError, match="no batches"):
        activation_sensitivities(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="hutch\\+\\+ needs num_matvecs >= 3"):
        activation_sensitivities(model, F.cross_entropy, data, trace_matvecs=2)
    _assert_untouched(model, snap)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(quantize(model, {"0": 4}, act_bits={"0": 4}), [])
    with pytest.raises(ValueError, match="none of its 1 quantized layers"):
        calibrate(quantize(model, {"0": 4}), data)


def bn_problem(seed=0):
    """Linear(4, 6) - BatchNorm1d (eval) - Tanh - Linear(6, 3) and the MLP's batches."""
    model = _forked(seed, lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(seed))
    _, data = tiny_mlp_problem(seed, 12, 7)
    return model.eval(), data


def test_calibrate_sets_global_ranges_the_sensitivities_report():
    model, data = bn_problem()
    weights = {"0": 3, "3": 3}
    qmodel = quantize(model, weights, act_bits={"0": 2, "3": 2})  # momentum 0.99: calibrate ignores it
    buffers = {k: v.clone() for k, v in qmodel.named_buffers() if "act_quantizer" not in k}
    rng = torch.get_rng_state()
    assert calibrate(qmodel, data) is qmodel
    assert not qmodel.training and not qmodel[1].training  # BatchNorm stays in eval mode
    assert all(torch.equal(v, buffers[k]) for k, v in qmodel.named_buffers() if k in buffers)
    assert torch.equal(torch.get_rng_state(), rng)
    # the ranges of the network with full-precision activations and these weights: the sensitivities' own
    weight_only = quantize(model, weights)
    inputs = layer_inputs(weight_only, data, ["0", "3"])
    reported = activation_sensitivities(weight_only, F.cross_entropy, data, bits=(2,), trace_matvecs=3).ranges()
    for name, a in inputs.items():
        q = qmodel.get_submodule(name).act_quantizer
        got = (float(q.running_min), float(q.running_max))
        assert got == (float(a.min().clamp(max=0).float()), float(a.max().clamp(min=0).float())) == reported[name]
        assert bool(q.initialized) and q.bits == 2 and q.momentum == 0.99
    # a second calibration replaces the range (not the union with the first)
    calibrate(qmodel, data[1])
    a = layer_inputs(weight_only, [data[1]], ["0"])["0"]
    assert float(qmodel[0].act_quantizer.running_max) == float(a.max().clamp(min=0).float())


def test_quantize_with_calibration_runs_in_eval_mode():
    model, data = bn_problem(1)
    X = torch.cat([b[0] for b in data])
    q = quantize(model, {"0": 4, "3": 4}, act_bits={"0": 4, "3": 4}, calibration=data)
    assert not q.training
    with torch.no_grad():
        out = q(X)
        assert out.shape == (12, 3) and torch.isfinite(out).all()
    plain = quantize(model, {"0": 4, "3": 4}, act_bits={"0": 4, "3": 4})  # no calibration: as before
    with pytest.raises(RuntimeError, match="no range yet"):
        plain(X)


def test_calibration_data_the_model_rejects_is_one_error_and_the_model_untouched():
    from secondorder.quant import measure_dependencies

    model, data, _ = mlp_problem()
    later_bad = [*data, (torch.randn(5, 7, dtype=torch.float64), torch.zeros(5, dtype=torch.long))]  # 7 features
    snap = _snapshot(model)
    for run in (lambda: activation_sensitivities(model, F.cross_entropy, later_bad, trace_matvecs=6),
                lambda: measure_dependencies(model, F.cross_entropy, later_bad, bits=(2, 4))):
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            run()
        _assert_untouched(model, snap)
    qmodel = quantize(model, {"0": 4}, act_bits={"0": 4})
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        calibrate(qmodel, later_bad)
    assert all(torch.equal(v, before[k]) for k, v in qmodel.state_dict().items())  # no half-set range
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in qmodel.modules())
