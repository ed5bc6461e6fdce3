"""ActivationHessianOperator against dense float64 Hessians w.r.t. the layers' input activations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.operators import ActivationHessianOperator
from secondorder.quant import quantize
from tests.references import tiny_mlp_problem


def dense_activation_hessian(model, loss_fn, batch, names):
    """The Hessian of ``eps -> loss(model with layer inputs + eps)`` at 0, by torch.autograd.functional.hessian.

    Perturbations are added by forward pre-hooks on ``model.get_submodule(name)``, in ``names`` order,
    each flattened in its own layout; run in the model's mode (no dropout, no train-mode BatchNorm here).
    """
    X, y = batch
    shapes = {}

    def recorder(name):
        return lambda module, args: shapes.setdefault(name, args[0].shape) and None

    handles = [model.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names]
    with torch.no_grad():
        model(X)
    for h in handles:
        h.remove()
    sizes = [math.prod(shapes[n]) for n in names]

    def f(flat):
        pieces = dict(zip(names, flat.split(sizes)))

        def adder(name):
            return lambda module, args: (args[0] + pieces[name].view(shapes[name]), *args[1:])

        hs = [model.get_submodule(n).register_forward_pre_hook(adder(n)) for n in names]
        try:
            return loss_fn(model(X), y)
        finally:
            for h in hs:
                h.remove()

    H = torch.autograd.functional.hessian(f, torch.zeros(sum(sizes), dtype=torch.float64))
    assert (H - H.T).abs().max() <= 1e-12 * H.abs().max().clamp_min(1e-300), "reference Hessian not symmetric"
    return H


def _forked(seed, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().double()


def mlp_batch(num=5, seed=0):
    model, data = tiny_mlp_problem(seed, num + 1, num)
    return model, data[0], ["0", "2"]


def cnn2d_batch(seed=0):
    model = _forked(seed, lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(),
                                                nn.Linear(8, 3)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial running statistics, then eval mode
        model[1].running_mean.uniform_(-0.5, 0.5, generator=gen)
        model[1].running_var.uniform_(0.5, 2.0, generator=gen)
    model.eval()
    X = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    return model, (X, torch.randint(0, 3, (3,), generator=gen)), ["0", "4"]


def cnn1d_batch(seed=0):
    model = _forked(seed, lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                                nn.Linear(15, 3)))
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    return model, (X, torch.randint(0, 3, (3,), generator=gen)), ["0", "3"]


def close(a, b, tol=1e-10):
    return (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_mlp_two_layers_match_dense_hessian(backend):
    model, batch, names = mlp_batch()
    op = ActivationHessianOperator(model, F.cross_entropy, batch, names, backend=backend, chunk_size=7)
    assert [(b.name, b.start, b.stop) for b in op.blocks] == [("0", 0, 20), ("2", 20, 50)]
    assert op.batch_size == 5 and op.activation_shapes == {"0": (5, 4), "2": (5, 6)}
    dense, ref = op.to_dense(), dense_activation_hessian(model, F.cross_entropy, batch, names)
    assert close(dense, ref) and close(dense, dense.T, 1e-13)
    assert ref[:20, 20:].abs().max() > 1e-3 and close(dense[:20, 20:], ref[:20, 20:])  # the coupling block
    v = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert close(op @ v, ref @ v) and op.num_matvecs == 51


@pytest.mark.parametrize("make", [cnn2d_batch, cnn1d_batch], ids=["conv2d", "conv1d"])
def test_conv_nets_match_dense_hessian(make):
    model, batch, names = make()
    op = ActivationHessianOperator(model, F.cross_entropy, batch, names)
    assert close(op.to_dense(), dense_activation_hessian(model, F.cross_entropy, batch, names))


def test_per_sample_block_diagonal_and_mean_trace():
    model, (X, y), names = mlp_batch(4)
    dense = ActivationHessianOperator(model, F.cross_entropy, (X, y), names).to_dense()
    sample = torch.cat([torch.arange(4).repeat_interleave(4), torch.arange(4).repeat_interleave(6)])
    assert dense[sample[:, None] != sample[None, :]].abs().max() <= 1e-15  # no coupling between samples
    per_sample = [dense_activation_hessian(model, F.cross_entropy, (X[s : s + 1], y[s : s + 1]), names)
                  for s in range(4)]
    assert float(dense.trace()) == pytest.approx(sum(float(H.trace()) for H in per_sample) / 4, rel=1e-12)
    # and each sample's diagonal block is its own Hessian / B
    for s, H in enumerate(per_sample):
        rows = (sample == s).nonzero().squeeze(1)
        assert close(dense[rows][:, rows] * 4, H)


def test_wrapped_layers_perturb_the_wrappers_input():
    model, batch, names = mlp_batch()
    plain = ActivationHessianOperator(model, F.cross_entropy, batch, names).to_dense()
    wrapped = quantize(model, {"0": None, "2": None})  # identity wrappers: the same function
    assert close(ActivationHessianOperator(wrapped, F.cross_entropy, batch, names).to_dense(), plain)
    q = quantize(model, {"0": 4, "2": 4}, act_bits={"0": 8, "2": 8}, calibration=batch).eval()
    assert close(ActivationHessianOperator(q, F.cross_entropy, batch, names).to_dense(),
                 dense_activation_hessian(q, F.cross_entropy, batch, names))


def _snapshot(model):
    return (copy.deepcopy(model.state_dict()), [m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()], torch.get_rng_state())


def _assert_untouched(model, snap):
    state, modes, grads, rng = snap
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_model_left_as_it_was_and_one_fixed_matrix():
    model = _forked(0, lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3),
                                             nn.Linear(6, 3)))
    model.train()
    model[0].bias.grad = torch.ones(6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
    snap = _snapshot(model)
    op = ActivationHessianOperator(model, F.cross_entropy, batch, ["0", "4"], seed=3)
    v = torch.randn(op.shape[0], 3, generator=gen, dtype=torch.float64)
    first = op @ v
    assert torch.equal(op @ v, first)  # the same dropout mask and BatchNorm statistics every time
    D = op.to_dense()
    assert close(D, D.T, 1e-12)  # train-mode BatchNorm couples samples, still one symmetric Hessian
    _assert_untouched(model, snap)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.emb(x)).mean(1)


def test_bad_input_is_refused_clearly_and_leaves_the_model():
    model, batch, names = mlp_batch()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"unknown layers \['1'\]; quantizable layers are \['0', '2'\]"):
        ActivationHessianOperator(model, F.cross_entropy, batch, ["0", "1"])
    with pytest.raises(ValueError, match="more than once"):
        ActivationHessianOperator(model, F.cross_entropy, batch, ["0", "0"])
    with pytest.raises(TypeError, match="one \\(inputs, targets\\) batch"):
        ActivationHessianOperator(model, F.cross_entropy, [batch, batch], names)
    with pytest.raises(TypeError, match="pass \\['0'\\]"):
        ActivationHessianOperator(model, F.cross_entropy, batch, "0")
    _assert_untouched(model, snap)
    X = torch.randn(2, 3)
    twice = _Twice()
    with pytest.raises(ValueError, match="'fc' is called more than once"):
        ActivationHessianOperator(twice, F.mse_loss, (X, X), ["fc"])
    with pytest.raises(ValueError, match=r"\['unused'\] were not called"):
        ActivationHessianOperator(twice, F.mse_loss, (X, X), ["unused"])
    assert all(not m._forward_pre_hooks for m in twice.modules())
    tokens = _Tokens()
    with pytest.raises(TypeError, match="'emb' gets a torch.int64 input"):
        ActivationHessianOperator(tokens, F.mse_loss, (torch.zeros(2, 4, dtype=torch.long), X), ["emb"])
    assert ActivationHessianOperator(tokens, F.mse_loss, (torch.zeros(2, 4, dtype=torch.long), X),
                                     ["fc"]).shape == (24, 24)
