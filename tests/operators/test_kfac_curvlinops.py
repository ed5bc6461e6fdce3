r"""KFACOperator against curvlinops' ``KFACLinearOperator`` (PyPI ``curvlinops-for-pytorch``, the
K-FAC anchor of ``anchors.txt``), dense matrix against dense matrix, in float64.

Where the conventions agree the two are equal to float64 rounding (about 1e-16 relative):

* **Fisher type.** Our ``"ggn"`` (per-sample symmetric square roots of the output Hessian, one
  backward per output) is curvlinops' ``fisher_type="type-2"``; ``"empirical"`` is
  ``"empirical"``. ``"mc"`` draws its labels from a different generator (our softmax CDF search
  vs their ``multinomial``), so the two can only agree in distribution: one cheap statistical
  check compares many-draw averages of both.
* **Weight sharing.** Our convolution factors are KFC's (Grosse & Martens 2016),
  :math:`A = \frac1N\sum_n\frac1T\sum_t \bar a_{nt}\bar a_{nt}^\top` and :math:`S` summed over
  samples *and* positions: that is curvlinops' ``kfac_approx="expand"`` (Eschenhagen et al.
  2023). ``"reduce"`` (positions averaged before the outer products) is a different
  approximation for convolutions (asserted to differ) and the same one for linear layers.
* **Weight and bias.** We factor the joint :math:`\bar W = [W, b]` through the homogeneous
  coordinate; curvlinops does with ``separate_weight_and_bias=False`` (its default ``True``
  gives the bias its own Kronecker factor :math:`S`, not a block of :math:`S\otimes A`).
* **Parameter order and layout.** Both flatten every parameter row-major (``p.flatten()``) and
  concatenate them in the order of the list given; curvlinops gets our ``op.params``, so the
  dense matrices are compared entry by entry (curvlinops documents its product as
  :math:`A\otimes B` of the column-stacked vec, which is our :math:`S\otimes A` of the row-major
  one).
* **Loss reduction.** Our operator is the curvature of the *mean* loss over the data set, with
  batches weighted by size; curvlinops with ``reduction="mean"`` is the same, also over a loader of
  unequal batches (its correction :math:`n_b^2/N`). With ``reduction="sum"`` curvlinops is the
  curvature of the summed loss: :math:`N` times ours (asserted).
* **MSE's empirical Fisher.** For ``MSELoss(reduction="mean")`` curvlinops multiplies the loss
  by :math:`\sqrt C` before the empirical (and MC) backward, so that its sampled factors estimate
  the type-2 ones with unit-variance-per-output labels; our ``"empirical"`` is the gradient
  covariance of the mean loss itself (we scale the MC label noise instead). Hence curvlinops'
  empirical MSE factor is :math:`C` times ours, and is divided by :math:`C` before comparing. The
  type-2/``"ggn"`` factors agree without any rescaling.

``check_deterministic=False`` only skips curvlinops' repeated passes (the models are
deterministic).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder.operators.kfac import KFACOperator
from tests.cases import gen

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch (anchors.txt) is not installed")
KFACLinearOperator = curvlinops.KFACLinearOperator

D = torch.float64
C = 3  # outputs of every model
FISHERS = {"ggn": "type-2", "empirical": "empirical"}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, C))


def _cnn() -> nn.Module:
    """Conv2d (padded, strided, with bias) - Conv2d without bias - Linear."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(3, 4, 2, bias=False),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, C))


MODELS = {"mlp": (_mlp, (5,)), "cnn": (_cnn, (2, 6, 6))}


def _model(kind: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MODELS[kind][0]().double()


def _batches(kind: str, loss: str, sizes: tuple[int, ...], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, n in enumerate(sizes):
        X = torch.randn(n, *MODELS[kind][1], generator=gen(seed + 2 * i), dtype=D)
        y = (torch.randint(0, C, (n,), generator=gen(seed + 2 * i + 1)) if loss == "ce"
             else torch.randn(n, C, generator=gen(seed + 2 * i + 1), dtype=D))
        out.append((X, y))
    return out


def _loss(loss: str, reduction: str = "mean") -> nn.Module:
    return nn.CrossEntropyLoss(reduction=reduction) if loss == "ce" else nn.MSELoss(reduction=reduction)


def _pair(kind: str, loss: str, fisher: str, sizes: tuple[int, ...], *, reduction: str = "mean",
          kfac_approx: str = "expand", mc_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(our dense K-FAC, curvlinops' dense K-FAC) on the same model and data."""
    model, batches = _model(kind), _batches(kind, loss, sizes)
    data = batches[0] if len(batches) == 1 else batches
    ours = KFACOperator(model, _loss(loss), data, fisher=fisher, mc_samples=mc_samples)
    theirs = KFACLinearOperator(model, _loss(loss, reduction), ours.params, batches,
                                fisher_type=FISHERS.get(fisher, fisher), mc_samples=mc_samples,
                                kfac_approx=kfac_approx, separate_weight_and_bias=False,
                                check_deterministic=False)
    eye = torch.eye(ours.shape[0], dtype=D)
    return ours @ eye, theirs @ eye


def _assert_equal(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-13) -> None:
    scale = float(theirs.abs().max())
    assert scale > 0
    err = float((ours - theirs).abs().max())
    assert err <= rtol * scale, f"max |ours - curvlinops| = {err:.3e}, {err / scale:.3e} of max |curvlinops|"


@pytest.mark.parametrize("sizes", [(7,), (5, 3, 4)], ids=["batch", "loader"])
@pytest.mark.parametrize("fisher", ["ggn", "empirical"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_kfac_equals_curvlinops_kfac_expand_with_joint_bias(kind, loss, fisher, sizes):
    ours, theirs = _pair(kind, loss, fisher, sizes)
    if loss == "mse" and fisher == "empirical":
        theirs = theirs / C  # curvlinops scales the mean MSE by sqrt(C) before the backward (module docstring)
    _assert_equal(ours, theirs)


@pytest.mark.parametrize("fisher", ["ggn", "empirical"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_summed_loss_gives_n_times_our_mean_loss_kfac(kind, fisher):
    ours, theirs = _pair(kind, "ce", fisher, (5, 3, 4), reduction="sum")
    _assert_equal(12 * ours, theirs)


def test_kfac_reduce_is_our_kfac_for_linear_layers_only():
    ours, theirs = _pair("mlp", "ce", "ggn", (5, 3, 4), kfac_approx="reduce")
    _assert_equal(ours, theirs)
    ours, theirs = _pair("cnn", "ce", "ggn", (5, 3, 4), kfac_approx="reduce")
    assert float((ours - theirs).abs().max()) > 1e-3 * float(theirs.abs().max())


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_sampled_label_kfac_agrees_with_curvlinops_in_distribution(loss):
    """Many label draws: both averages near each other and near the exact type-2 factors."""
    exact, _ = _pair("mlp", loss, "ggn", (8,))
    ours, theirs = _pair("mlp", loss, "mc", (8,), mc_samples=400)
    norm = float(exact.norm())
    assert float((ours - exact).norm()) < 0.1 * norm
    assert float((theirs - exact).norm()) < 0.1 * norm
    assert float((ours - theirs).norm()) < 0.15 * norm
    assert float((ours - theirs).abs().max()) > 0  # different draws: a real estimate, not the exact factors
