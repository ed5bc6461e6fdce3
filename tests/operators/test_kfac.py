"""KFACOperator against dense float64 references: the Kronecker identity and its damped inverse,
cases where K-FAC is exact (one linear layer with squared loss, one sample per batch), the
convolution factors of an explicit im2col, the sampled-label factors' mean, and its exact
trace, log-determinant and spectrum."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.operators.base import Block
from secondorder.operators.kfac import KFACOperator, KroneckerFactors, damped_pi, im2col
from tests.cases import gen

D = torch.float64


def _spd(n: int, seed: int) -> torch.Tensor:
    M = torch.randn(n, n + 2, generator=gen(seed), dtype=D)
    return M @ M.T / n + 0.1 * torch.eye(n, dtype=D)


def _net(layers: Callable[[], tuple[nn.Module, ...]]) -> nn.Module:
    """A float64 Sequential of the ``layers()``, built from seed 0 (the global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(*layers()).double()


def _block_diagonal(dense: torch.Tensor, blocks) -> torch.Tensor:
    out = torch.zeros_like(dense)
    for b in blocks:
        out[b.start : b.stop, b.start : b.stop] = dense[b.start : b.stop, b.start : b.stop]
    return out


def _given(d_out=3, d_in=4):
    """An operator of random SPD factors over one layer's weight [d_out, d_in - 1] and bias [d_out]."""
    W, b = torch.zeros(d_out, d_in - 1, dtype=D), torch.zeros(d_out, dtype=D)
    f = KroneckerFactors("layer", 0, 1, A=_spd(d_in, 1), S=_spd(d_out, 2))
    return KFACOperator.from_factors([W, b], [f], (Block("layer", 0, d_out * d_in, ("weight", "bias")),)), f


def _vec_joint(P_dense: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """The permutation from [vec(W) (row-major), b] to vec([W, b]) (row-major)."""
    order = [i * (d_in - 1) + j for i in range(d_out) for j in range(d_in - 1)]
    joint = []
    for i in range(d_out):
        joint += [order[i * (d_in - 1) + j] for j in range(d_in - 1)] + [d_out * (d_in - 1) + i]
    return P_dense[joint][:, joint]


def test_products_are_the_kronecker_product_and_the_inverse_its_damped_inverse():
    op, f = _given()
    dense = _vec_joint(op.to_dense(), 3, 4)
    assert torch.allclose(dense, torch.kron(f.S, f.A), rtol=1e-13, atol=1e-14)
    damping = 1e-2
    pi = damped_pi(f)
    damped = torch.kron(f.S + math.sqrt(damping) / pi * torch.eye(3, dtype=D),
                        f.A + pi * math.sqrt(damping) * torch.eye(4, dtype=D))
    inverse = _vec_joint(op.inverse(damping).to_dense(), 3, 4)
    assert torch.allclose(inverse, torch.linalg.inv(damped), rtol=1e-10, atol=1e-12)


def test_one_linear_layer_with_squared_loss_is_exactly_the_ggn():
    X, Y = torch.randn(20, 4, generator=gen(3), dtype=D), torch.randn(20, 3, generator=gen(4), dtype=D)
    layer = _net(lambda: (nn.Linear(4, 3),))
    kfac = KFACOperator(layer, nn.MSELoss(), (X, Y)).to_dense()
    ggn = so.GGNOperator(layer, nn.MSELoss(), (X, Y)).to_dense()
    assert torch.allclose(kfac, ggn, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss, target", [(nn.CrossEntropyLoss(), torch.tensor([2])),
                                          (nn.MSELoss(), torch.zeros(1, 3, dtype=D))], ids=["ce", "mse"])
def test_one_sample_gives_the_exact_block_diagonal_ggn(loss, target):
    X = torch.randn(1, 4, generator=gen(5), dtype=D)
    net = _net(lambda: (nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    kfac = KFACOperator(net, loss, (X, target))
    ggn = so.GGNOperator(net, loss, (X, target))
    assert torch.allclose(kfac.to_dense(), _block_diagonal(ggn.to_dense(), ggn.blocks), rtol=1e-12, atol=1e-14)


def test_a_loader_weights_batches_by_size():
    X, y = torch.randn(13, 4, generator=gen(6), dtype=D), torch.randint(0, 3, (13,), generator=gen(7))
    net = _net(lambda: (nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    batches = [(X[:5], y[:5]), (X[5:10], y[5:10]), (X[10:], y[10:])]
    loader, one = KFACOperator(net, nn.CrossEntropyLoss(), batches), KFACOperator(net, nn.CrossEntropyLoss(), (X, y))
    for a, b in zip(loader.factors, one.factors):
        assert torch.allclose(a.A, b.A, rtol=1e-13)  # A is a per-sample mean, whatever the batches
        assert torch.allclose(a.S, b.S, rtol=1e-12)  # S: each sample's output Hessian, 1/N each
    assert loader.num_samples == 13


def test_convolution_factors_are_those_of_an_explicit_im2col():
    X, y = torch.randn(3, 2, 5, 5, generator=gen(8), dtype=D), torch.tensor([0, 2, 1])
    net = _net(lambda: (nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)))
    conv = net[0]
    kfac = KFACOperator(net, nn.CrossEntropyLoss(), (X, y))
    padded = nn.functional.pad(X, (1, 1, 1, 1))
    patches = torch.stack([torch.cat([padded[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(3, -1),
                                      torch.ones(3, 1, dtype=D)], dim=1) for i in range(3) for j in range(3)], 1)
    A = torch.einsum("nti,ntj->ij", patches, patches) / (3 * 9)
    assert torch.allclose(kfac.factors[0].A, A, rtol=1e-12)
    # S: sum over samples, positions and output-Hessian square-root columns of d(outputs)/d(conv output)^T M
    s = conv(X).detach().requires_grad_(True)
    head = lambda pre: net[1:](pre)  # noqa: E731
    J = torch.autograd.functional.jacobian(head, s)  # [N, 3, N, C_out, 3, 3]
    S = torch.zeros(3, 3, dtype=D)
    for n in range(3):
        p = torch.softmax(head(s)[n], 0).detach()
        H = (torch.diag(p) - torch.outer(p, p)) / 3
        lam, Q = torch.linalg.eigh(H)
        M = Q * lam.clamp_min(0).sqrt()
        G = torch.einsum("kc,kotu->cotu", M, J[n, :, n])  # per column c: gradient on [C_out, 3, 3]
        G = G.reshape(3, 3, 9)
        S += torch.einsum("cot,cpt->op", G, G)
    assert torch.allclose(kfac.factors[0].S, S, rtol=1e-10, atol=1e-14)


def test_a_conv1d_has_the_factors_of_the_conv2d_of_height_one():
    X, y = torch.randn(3, 2, 7, generator=gen(8), dtype=D), torch.tensor([0, 2, 1])
    net1 = _net(lambda: (nn.Conv1d(2, 3, 3, padding=2, stride=2, dilation=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4, 3)))
    net2 = _net(lambda: (nn.Conv2d(2, 3, (1, 3), padding=(0, 2), stride=(1, 2), dilation=(1, 2)), nn.Tanh(),
                         nn.Flatten(), nn.Linear(3 * 4, 3)))
    with torch.no_grad():
        net2[0].weight.copy_(net1[0].weight.unsqueeze(2))
        net2[0].bias.copy_(net1[0].bias)
        net2[3].load_state_dict(net1[3].state_dict())
    one = KFACOperator(net1, nn.CrossEntropyLoss(), (X, y))
    two = KFACOperator(net2, nn.CrossEntropyLoss(), (X.unsqueeze(2), y))
    for a, b in zip(one.factors, two.factors):
        assert torch.allclose(a.A, b.A, rtol=1e-13, atol=1e-15) and torch.allclose(a.S, b.S, rtol=1e-12, atol=1e-15)
    assert torch.equal(one.to_dense(), two.to_dense())


def test_sampled_label_factors_are_unbiased_for_the_ggn_factors():
    X, y = torch.randn(6, 4, generator=gen(9), dtype=D), torch.randint(0, 3, (6,), generator=gen(10))
    net = _net(lambda: (nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    exact = KFACOperator(net, nn.CrossEntropyLoss(), (X, y)).factors
    draws = torch.stack([torch.stack([f.S.flatten() for f in KFACOperator(
        net, nn.CrossEntropyLoss(), (X, y), fisher="mc", seed=s).factors[1:]]) for s in range(300)])
    mean, sem = draws.mean(0), draws.std(0) / math.sqrt(300)
    z = (mean - exact[1].S.flatten()) / sem.clamp_min(1e-300)
    assert float(z.abs().max()) < 4.5, z  # 9 entries: |z| < 4.5 fails by chance with p ~ 6e-5
    assert float((mean - exact[1].S.flatten()).abs().max()) > 0  # a real estimate, not the exact factor


def test_exact_trace_logdet_and_spectrum_and_every_algorithm_runs_on_it():
    X, Y = torch.randn(30, 4, generator=gen(11), dtype=D), torch.randn(30, 3, generator=gen(12), dtype=D)
    net = _net(lambda: (nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    op = KFACOperator(net, nn.MSELoss(), (X, Y))  # positive definite (cross-entropy's S is singular)
    dense = op.to_dense()
    assert torch.allclose(dense, dense.T, atol=1e-15)
    lam = torch.linalg.eigvalsh(dense)
    assert op.trace() == pytest.approx(float(lam.sum()), rel=1e-12)
    assert op.logdet() == pytest.approx(float(torch.log(lam).sum()), rel=1e-9)
    products = torch.cat([torch.outer(ls, la).flatten() for la, _, ls, _ in op.factor_eigendecomposition()])
    assert torch.allclose(products.sort().values, lam, rtol=1e-9, atol=1e-13)
    top = so.eigenvalues(op, k=3, seed=0)
    assert torch.allclose(top.eigenvalues, lam.flip(0)[:3], rtol=1e-8)
    assert so.trace(op, num_matvecs=60, seed=0).value == pytest.approx(op.trace(), rel=0.2)


def test_bad_input_is_refused_by_name():
    X, y = torch.randn(4, 4, dtype=D), torch.tensor([0, 1, 2, 0])
    normed = _net(lambda: (nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)))
    with pytest.raises(ValueError, match=r"1\.weight \(LayerNorm\), 1\.bias \(LayerNorm\)"):
        KFACOperator(normed, nn.CrossEntropyLoss(), (X, y))
    op = KFACOperator(normed, nn.CrossEntropyLoss(), (X, y), params=lambda n, p: not n.startswith("1."))
    assert op.shape[0] == 5 * 5 + 3 * 6
    with pytest.raises(ValueError, match="select both or neither"):
        KFACOperator(normed, nn.CrossEntropyLoss(), (X, y), params=["0.weight", "2"])
    with pytest.raises(ValueError, match="damping"):
        op.inverse(0.0)
    with pytest.raises(ValueError, match="fisher='mc' samples labels"):
        KFACOperator(_net(lambda: (nn.Linear(4, 3),)), nn.L1Loss(), (X, torch.zeros(4, 3, dtype=D)), fisher="mc")
    with pytest.raises(ValueError, match="fisher"):
        KFACOperator(_net(lambda: (nn.Linear(4, 3),)), nn.CrossEntropyLoss(), (X, y), fisher="kfra")


@pytest.mark.parametrize("kernel, dilation, padding, stride", [
    ((3, 3), (1, 1), (1, 1), (2, 2)), ((1, 5), (1, 1), (0, 2), (1, 1)), ((2, 3), (2, 1), (0, 3), (1, 2)),
    ((3, 2), (1, 3), (2, 0), (3, 1)), ((1, 1), (1, 1), (0, 0), (1, 1)),
])
def test_im2col_is_unfold(kernel, dilation, padding, stride):
    x = torch.randn(2, 3, 7, 9, generator=gen(3), dtype=D)
    want = nn.functional.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)
    assert torch.equal(im2col(x, kernel, dilation, padding, stride), want)
