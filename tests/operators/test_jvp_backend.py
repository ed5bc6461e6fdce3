"""backend="jvp" (forward-over-reverse, vmap(jvp(grad))) against dense float64 references and the loop backend."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import GGNOperator, HessianOperator, trace
from tests.cases import LOSSES, KeywordModel, cnn, data, gen, mlp, names, ragged
from tests.references import dense_hessian

TOL = 1e-10


def close(a, b, tol=TOL):
    return (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


def layernorm_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():  # a non-trivial affine map
        model[1].weight.uniform_(0.5, 1.5, generator=gen(11))
        model[1].bias.uniform_(-0.5, 0.5, generator=gen(12))
    return model


def dropout_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()


@pytest.mark.parametrize(
    "arch, loss, chunk_size",
    [("mlp", "ce", None), ("mlp", "mse", 2), ("cnn", "ce", None), ("cnn", "bce", 7), ("layernorm", "ce", 2)],
)
def test_matches_dense_reference_on_ragged_loader(arch, loss, chunk_size):
    model = {"mlp": mlp, "cnn": cnn, "layernorm": layernorm_model}[arch]()
    X, y = data("cnn" if arch == "cnn" else "mlp", loss)
    batches = ragged(X, y)
    # dense_hessian asserts the reference's symmetry (torch.autograd.functional, not torch.func.hessian,
    # which is wrong through an affine LayerNorm in torch 2.13)
    reference = dense_hessian(model, LOSSES[loss], batches, names(model))
    state = copy.deepcopy(model.state_dict())
    A = HessianOperator(model, LOSSES[loss], batches, backend="jvp", chunk_size=chunk_size)
    dense = A.to_dense()
    assert close(dense, reference)
    assert A.num_samples == 13
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_one_batch_and_eval_batchnorm():
    model = cnn(bn=True)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5, generator=gen(1))
        model[1].running_var.uniform_(0.5, 2.0, generator=gen(2))
    model.eval()
    X, y = data("cnn", "ce")
    reference = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    assert close(HessianOperator(model, F.cross_entropy, (X, y), backend="jvp").to_dense(), reference)


def test_parameter_subset():
    model = mlp()
    X, y = data("mlp", "ce")
    full = dense_hessian(model, F.cross_entropy, ragged(X, y), names(model))
    A = HessianOperator(model, F.cross_entropy, ragged(X, y), params=["2"], backend="jvp", chunk_size=2)
    assert A.param_names == ("2.weight", "2.bias")
    assert close(A.to_dense(), full[36:, 36:])
    B = HessianOperator(model, F.cross_entropy, (X, y), params=lambda n, p: n.endswith("weight"), backend="jvp")
    idx = torch.cat([torch.arange(0, 30), torch.arange(36, 54)])
    ref = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    assert close(B.to_dense(), ref[idx][:, idx])


def test_dict_inputs_are_keywords():
    model = KeywordModel()
    X, y = data("mlp", "ce")
    A = HessianOperator(model, F.cross_entropy, [({"features": X[:8]}, y[:8]), ({"features": X[8:]}, y[8:])],
                        backend="jvp")
    reference = dense_hessian(model.inner, F.cross_entropy, ragged(X, y, (8, 5)), names(model.inner))
    assert close(A.to_dense(), reference)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_dropout_in_train_mode_same_matrix_as_loop(chunk_size):
    model = dropout_model()
    X, y = data("mlp", "ce")
    loop = HessianOperator(model, F.cross_entropy, ragged(X, y), seed=3, backend="loop").to_dense()
    A = HessianOperator(model, F.cross_entropy, ragged(X, y), seed=3, backend="jvp", chunk_size=chunk_size)
    before = torch.get_rng_state()
    dense = A.to_dense()
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    assert close(dense, loop)  # one mask for every probe, every chunk, and the loop backend's mask
    assert (dense - dense.T).abs().max() <= 1e-12
    v = torch.randn(A.shape[0], 3, generator=gen(0), dtype=torch.float64)
    assert torch.equal(A @ v, A @ v)  # one fixed matrix across products
    model.eval()  # and the masks did matter
    assert not close(HessianOperator(model, F.cross_entropy, ragged(X, y), backend="jvp").to_dense(), loop, 1e-3)


def test_quadratic_forms_and_trace_equal_loop():
    model = cnn()
    X, y = data("cnn", "ce")
    loop = HessianOperator(model, F.cross_entropy, ragged(X, y), backend="loop")
    jvp = HessianOperator(model, F.cross_entropy, ragged(X, y), backend="jvp", chunk_size=3)
    signs = torch.randint(0, 2, (jvp.shape[0], 5), generator=gen(4), dtype=torch.int8) * 2 - 1
    expected = loop.quadratic_forms(signs)
    forms = jvp.quadratic_forms(signs)
    assert forms.shape == (len(jvp.blocks), 5) and jvp.num_matvecs == 5
    assert (forms - expected).abs().max() <= 1e-12 * expected.abs().max()
    for method in ("hutchinson", "hutch++"):
        a, b = trace(loop, 12, method=method, seed=0), trace(jvp, 12, method=method, seed=0)
        assert abs(a.value - b.value) <= 1e-10 * abs(a.value)
        assert all(abs(p.value - q.value) <= 1e-10 * max(1.0, abs(p.value)) for p, q in zip(a.blocks, b.blocks))


def test_rejects_closure_and_ggn():
    model = mlp()
    X, y = data("mlp", "ce")
    with pytest.raises(ValueError, match=r"needs loss_fn\(outputs, targets\)"):
        HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (X, y), closure=True, backend="jvp")
    with pytest.raises(ValueError, match="'loop' or 'vmap'"):
        GGNOperator(model, F.cross_entropy, (X, y), backend="jvp")
    with pytest.raises(ValueError, match="'auto', 'loop', 'vmap' or 'jvp'"):
        HessianOperator(model, F.cross_entropy, (X, y), backend="jax")


def test_train_batchnorm_rejected_with_advice_and_model_untouched():
    model = mlp(bn=True)
    model.train()
    X, y = data("mlp", "ce")
    state = copy.deepcopy(model.state_dict())
    A = HessianOperator(model, F.cross_entropy, (X, y), backend="jvp")
    with pytest.raises(ValueError, match=r"train-mode BatchNorm .*model\.eval\(\).*'loop'"):
        A @ torch.ones(A.shape[0], dtype=torch.float64)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_loss_checks():
    model = mlp()
    X, y = data("mlp", "ce")
    A = HessianOperator(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (X, y), backend="jvp")
    with pytest.raises(ValueError, match="the loss of batch 0 must be a scalar tensor"):
        A @ torch.ones(A.shape[0], dtype=torch.float64)
    from secondorder import NonFiniteError

    B = HessianOperator(model, lambda o, t: F.cross_entropy(o, t) * float("inf"), [(X[:4], y[:4]), (X, y)],
                        backend="jvp")
    with pytest.raises(NonFiniteError, match="batch 0"):
        B @ torch.ones(B.shape[0], dtype=torch.float64)


def test_float32_and_gradient_contract():
    from secondorder.operators.products import hessian_product, hessian_product_jvp
    from secondorder.operators.sinks import product_sink

    model = mlp()
    X, y = data("mlp", "ce")
    params = list(model.parameters())
    V = torch.randn(3, sum(p.numel() for p in params), generator=gen(9), dtype=torch.float64)
    out_jvp, out_loop = torch.zeros_like(V), torch.zeros_like(V)
    g_jvp = hessian_product_jvp(model, F.cross_entropy, X, y, names(model), V, product_sink(out_jvp, params, 1.0), 2)
    g_loop = hessian_product(F.cross_entropy(model(X), y), params, V, product_sink(out_loop, params, 1.0))
    assert (out_jvp - out_loop).abs().max() <= 1e-12
    assert all((a - b).abs().max() <= 1e-13 and not a.requires_grad for a, b in zip(g_jvp, g_loop))
    empty = hessian_product_jvp(model, F.cross_entropy, X, y, names(model), V[:0], product_sink(V[:0], params, 1.0))
    assert all((a - b).abs().max() <= 1e-13 for a, b in zip(empty, g_jvp))

    A = HessianOperator(mlp().float(), F.cross_entropy, (X.float(), y), backend="jvp")
    out = A @ torch.ones(A.shape[0], dtype=torch.float64)
    assert out.dtype == torch.float32
    ref = dense_hessian(mlp(), F.cross_entropy, [(X, y)], names(model)) @ torch.ones(A.shape[0], dtype=torch.float64)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_auto_backend_choice_by_device_and_model():
    from torch import nn as _nn

    from secondorder.operators.curvature import choose_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cnn = _nn.Sequential(_nn.Conv2d(1, 2, 3), _nn.Flatten(), _nn.Linear(8, 2))
    mlp = _nn.Sequential(_nn.Linear(3, 4), _nn.Tanh(), _nn.Linear(4, 2))
    bn = _nn.Sequential(_nn.Conv2d(1, 2, 3), _nn.BatchNorm2d(2)).train()
    assert choose_backend(cnn, cpu, False, True) == "loop" and choose_backend(mlp, cpu, False, True) == "loop"
    assert choose_backend(cnn, cuda, False, True) == "jvp"
    assert choose_backend(mlp, cuda, False, True) == "vmap"
    assert choose_backend(cnn, cuda, True, True) == "vmap"  # a loss closure cannot be called functionally
    assert choose_backend(cnn, cuda, False, False) == "vmap"  # the Gauss-Newton has no jvp backend
    assert choose_backend(bn, cuda, False, True) == "vmap" and choose_backend(bn.eval(), cuda, False, True) == "jvp"
