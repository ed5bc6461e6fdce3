"""Curvature operators against dense float64 references over a case matrix."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder import Block, GGNOperator, HessianOperator
from tests.cases import LOSSES, KeywordModel, cnn, data, gen, mlp, names, ragged
from tests.references import closure_hessian, dense_ggn, dense_hessian

TOL = 1e-10  # float64 products against float64 references: only rounding separates them


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
@pytest.mark.parametrize("bn_mode", [None, "eval", "train"])
@pytest.mark.parametrize("operator", ["hessian", "ggn"])
@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_matches_dense_reference_on_ragged_loader(arch, loss, bn_mode, operator, backend):
    model = (mlp if arch == "mlp" else cnn)(bn=bn_mode is not None)
    model.train(bn_mode == "train")
    X, y = data(arch, loss)
    batches = ragged(X, y)
    reference = (dense_hessian if operator == "hessian" else dense_ggn)(model, LOSSES[loss], batches, names(model))
    state = copy.deepcopy(model.state_dict())
    A = (HessianOperator if operator == "hessian" else GGNOperator)(model, LOSSES[loss], batches, backend=backend)
    dense = A.to_dense()
    assert (dense - reference).abs().max() <= TOL * max(1.0, reference.abs().max().item())
    assert model.training == (bn_mode == "train")  # mode untouched
    for k, v in model.state_dict().items():  # running statistics restored
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_one_batch_equals_loader_without_batchnorm(operator):
    model = mlp()
    X, y = data("mlp", "ce")
    one = operator(model, LOSSES["ce"], (X, y)).to_dense()
    loader = operator(model, LOSSES["ce"], ragged(X, y, (4, 4, 4, 1))).to_dense()
    assert (one - loader).abs().max() <= 1e-12 * one.abs().max()


def test_gauss_newton_equals_hessian_for_linear_model_and_mse():
    """For a linear model and MSE the Hessian is exactly the Gauss-Newton matrix."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(5, 3).double()
    X, y = data("mlp", "mse")
    H = HessianOperator(model, F.mse_loss, (X, y)).to_dense()
    G = GGNOperator(model, F.mse_loss, (X, y)).to_dense()
    assert (H - G).abs().max() <= 1e-13


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(label_smoothing=0.1), nn.NLLLoss()])
def test_ggn_closed_form_and_autograd_fallback(loss_fn):
    """Functional and configured losses (closed form or exact autograd fallback) match the reference."""
    model = mlp()
    if isinstance(loss_fn, nn.NLLLoss):
        model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    X, y = data("mlp", "ce")
    reference = dense_ggn(model, loss_fn, [(X, y)], names(model))
    dense = GGNOperator(model, loss_fn, (X, y)).to_dense()
    assert (dense - reference).abs().max() <= TOL


def test_cross_entropy_ignore_index():
    model = mlp()
    X, y = data("mlp", "ce")
    y = y.clone()
    y[:3] = -100
    for operator, ref in ((GGNOperator, dense_ggn), (HessianOperator, dense_hessian)):
        reference = ref(model, F.cross_entropy, [(X, y)], names(model))
        assert (operator(model, F.cross_entropy, (X, y)).to_dense() - reference).abs().max() <= TOL


def test_bce_on_probabilities():
    model = nn.Sequential(mlp(), nn.Sigmoid())
    X, y = data("mlp", "bce")
    reference = dense_ggn(model, nn.BCELoss(), [(X, y)], names(model))
    assert (GGNOperator(model, nn.BCELoss(), (X, y)).to_dense() - reference).abs().max() <= TOL


def test_closure_loss_with_dict_batches():
    model = mlp()
    X, y = data("mlp", "ce")
    batches = [{"x": X[:8], "label": y[:8]}, {"x": X[8:], "label": y[8:]}]

    def closure(m, batch):
        return F.cross_entropy(m(batch["x"]), batch["label"]) + 0.1 * (m(batch["x"]) ** 2).mean()

    reference = closure_hessian(model, closure, batches, names(model), [8, 5])
    A = HessianOperator(model, closure, batches, closure=True)
    assert (A.to_dense() - reference).abs().max() <= TOL


def test_dict_inputs_call_model_with_keywords():
    model = KeywordModel()
    X, y = data("mlp", "ce")
    A = HessianOperator(model, F.cross_entropy, ({"features": X}, y))
    reference = dense_hessian(model.inner, F.cross_entropy, [(X, y)], names(model.inner))
    assert (A.to_dense() - reference).abs().max() <= TOL


def test_parameter_subsets_and_blocks():
    model = mlp()
    X, y = data("mlp", "ce")
    full = dense_hessian(model, F.cross_entropy, [(X, y)], names(model))
    A = HessianOperator(model, F.cross_entropy, (X, y), params=["2"])  # module prefix
    assert A.param_names == ("2.weight", "2.bias")
    assert A.shape == (21, 21)  # 6 * 3 weights + 3 biases, after the 5 * 6 + 6 of the first layer
    start = 5 * 6 + 6
    sub = full[start:, start:]
    assert (A.to_dense() - sub).abs().max() <= TOL
    B = HessianOperator(model, F.cross_entropy, (X, y), params=lambda n, p: n.endswith("weight"), blocks="parameter")
    assert [b.name for b in B.blocks] == ["0.weight", "2.weight"]
    idx = torch.cat([torch.arange(0, 30), torch.arange(36, 36 + 18)])
    assert (B.to_dense() - full[idx][:, idx]).abs().max() <= TOL
    module_blocks = HessianOperator(model, F.cross_entropy, (X, y)).blocks
    assert module_blocks == (Block("0", 0, 36, ("0.weight", "0.bias")), Block("2", 36, 57, ("2.weight", "2.bias")))


class UnusedAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.unused = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.shift = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))  # enters the loss linearly

    def forward(self, x):
        return self.body(x)


def test_unused_and_linear_parameters_have_zero_curvature():
    model = UnusedAndLinear()
    X, y = data("mlp", "ce")

    def closure(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1]) + m.shift

    A = HessianOperator(model, closure, (X, y), closure=True)
    dense = A.to_dense()
    assert A.param_names[:2] == ("unused", "shift")  # a module's own parameters come first
    ref = dense_hessian(model.body, F.cross_entropy, [(X, y)], names(model.body))
    assert (dense[5:, 5:] - ref).abs().max() <= TOL
    assert dense[:5].abs().max() == 0 and dense[:, :5].abs().max() == 0


def test_dropout_in_train_mode_fixed_matrix_and_global_rng_untouched():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    X, y = data("mlp", "ce")
    A = HessianOperator(model, F.cross_entropy, ragged(X, y))
    v = torch.randn(A.shape[0], 3, generator=gen(0), dtype=torch.float64)
    before = torch.get_rng_state()
    first, second = A @ v, A @ v
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, second)  # one fixed matrix across products (Lanczos and CG need it)
    dense = A.to_dense()
    assert (dense - dense.T).abs().max() <= 1e-12
    model.eval()
    ref = dense_hessian(model, F.cross_entropy, ragged(X, y), names(model))
    assert (HessianOperator(model, F.cross_entropy, ragged(X, y)).to_dense() - ref).abs().max() <= TOL


def test_products_vector_block_chunks_and_counting():
    model = cnn()
    X, y = data("cnn", "ce")
    A = HessianOperator(model, F.cross_entropy, ragged(X, y))
    C = HessianOperator(model, F.cross_entropy, ragged(X, y), chunk_size=2, backend="vmap")
    V = torch.randn(A.shape[0], 5, generator=gen(3), dtype=torch.float64)
    AV = A @ V
    assert AV.shape == V.shape and A.num_matvecs == 5
    assert (C @ V - AV).abs().max() <= 1e-12
    assert ((A @ V[:, 0]) - AV[:, 0]).abs().max() <= 1e-12
    assert A.num_matvecs == 6
    scipy_op = A.to_scipy()
    assert abs(scipy_op.matvec(V[:, 1].numpy()) - AV[:, 1].numpy()).max() <= 1e-12


def test_float32_model_float32_products():
    model = mlp().float()
    X, y = data("mlp", "ce")
    A = HessianOperator(model, F.cross_entropy, (X.float(), y))
    assert A.dtype == torch.float32
    out = A @ torch.ones(A.shape[0], dtype=torch.float64)  # cast to the operator's dtype
    assert out.dtype == torch.float32
    ref = dense_hessian(mlp(), F.cross_entropy, [(X, y)], names(model)) @ torch.ones(A.shape[0], dtype=torch.float64)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_operator_algebra():
    model = mlp()
    X, y = data("mlp", "ce")
    H = HessianOperator(model, F.cross_entropy, (X, y))
    G = GGNOperator(model, F.cross_entropy, (X, y))
    from secondorder import IdentityOperator

    damped = H - 0.5 * G + 2.0 * IdentityOperator(H.shape[0], torch.float64)
    expected = H.to_dense() - 0.5 * G.to_dense() + 2.0 * torch.eye(H.shape[0], dtype=torch.float64)
    assert (damped.to_dense() - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_quadratic_forms_reduce_without_the_product_block(operator, backend):
    """Per-block v^T C v from int8 signs equals the block sums of V * (C V), and counts K products."""
    model = mlp()
    X, y = data("mlp", "ce")
    A = operator(model, LOSSES["ce"], ragged(X, y), backend=backend, chunk_size=2)
    signs = torch.randint(0, 2, (A.shape[0], 5), generator=gen(4), dtype=torch.int8) * 2 - 1
    V = signs.double()
    expected = torch.stack([(V * (A @ V))[b.start : b.stop].sum(0) for b in A.blocks])
    before = A.num_matvecs
    forms = A.quadratic_forms(signs)
    assert A.num_matvecs - before == 5
    assert forms.shape == (len(A.blocks), 5)
    assert (forms - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_shuffling_loader_with_train_batchnorm_is_one_fixed_matrix():
    """Batch statistics depend on which samples share a batch: the shuffle order must not change."""
    model = mlp(bn=True)
    model.train()
    X, y = data("mlp", "ce", n=24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=6, shuffle=True)
    A = HessianOperator(model, F.cross_entropy, loader)
    v = torch.randn(A.shape[0], 2, generator=gen(5), dtype=torch.float64)
    before = torch.get_rng_state()
    first = A @ v
    torch.rand(3)  # the caller's own random draws between products must not matter
    assert torch.equal(A @ v, first)
    assert not torch.equal(torch.get_rng_state(), before)  # only the caller's draw moved the global RNG
    dense = A.to_dense()
    assert (dense - dense.T).abs().max() <= 1e-12 * dense.abs().max()
