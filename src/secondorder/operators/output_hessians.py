r"""Hessians of the loss with respect to the model's outputs, for the Gauss-Newton matrix.

The generalized Gauss-Newton matrix of a mean loss :math:`\frac1N\sum_n \ell(f(x_n;\theta), y_n)`
is :math:`G = J^\top H_\ell J` with :math:`J = \partial f/\partial\theta` and
:math:`H_\ell = \partial^2 \ell / \partial f^2` (Schraudolph 2002; Martens 2020, "New insights
and perspectives on the natural gradient method"). For the common losses :math:`H_\ell` has a
closed form, which avoids a double backward through softmax:

* cross-entropy on logits :math:`z`, :math:`p = \mathrm{softmax}(z)`:
  :math:`H_\ell u = (p \odot u - p\,(p^\top u)) / N_{\text{valid}}`;
* mean squared error over :math:`M` output entries: :math:`H_\ell u = 2u/M`;
* binary cross-entropy with logits, :math:`\sigma = \mathrm{sigmoid}(z)`: :math:`\sigma(1-\sigma)\,u/M`;
* binary cross-entropy on probabilities :math:`p`: :math:`(y/p^2 + (1-y)/(1-p)^2)\,u/M`.

Any other loss falls back to an exact autograd product through the loss alone.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OutputHessian = Callable[[Tensor], Tensor]
"""Maps a batch of output-space tangents ``[K, *outputs.shape]`` to ``H_l`` times each."""


def _cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int) -> OutputHessian:
    p = torch.softmax(logits, dim=1)
    valid = (targets != ignore_index).unsqueeze(1).to(logits.dtype)
    p = p * valid
    scale = 1.0 / valid.sum().clamp_min(1.0)

    def product(U: Tensor) -> Tensor:
        pu = p * U
        return (pu - p * pu.sum(dim=2, keepdim=True)) * scale

    return product


def _diagonal(weights: Tensor) -> OutputHessian:
    return lambda U: U * weights


def _autograd(loss_fn: Callable, outputs: Tensor, targets) -> OutputHessian:
    f = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(f, targets), f, create_graph=True)
    if not g.requires_grad:  # the loss is linear in the outputs
        return lambda U: torch.zeros_like(U)

    def product(U: Tensor) -> Tensor:
        (hu,) = torch.autograd.grad(g, f, grad_outputs=U, retain_graph=True, is_grads_batched=True, allow_unused=True)
        return hu if hu is not None else torch.zeros_like(U)

    return product


def _loss_kind(loss_fn: Callable) -> tuple[str, dict] | None:
    """Recognize the standard mean-reduced losses whose output Hessian has a closed form."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0 and loss_fn.reduction == "mean"
        return ("ce", {"ignore_index": loss_fn.ignore_index}) if plain else None
    if isinstance(loss_fn, nn.MSELoss):
        return ("mse", {}) if loss_fn.reduction == "mean" else None
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        plain = loss_fn.weight is None and loss_fn.pos_weight is None and loss_fn.reduction == "mean"
        return ("bce_logits", {}) if plain else None
    if isinstance(loss_fn, nn.BCELoss):
        return ("bce", {}) if loss_fn.weight is None and loss_fn.reduction == "mean" else None
    return {
        F.cross_entropy: ("ce", {"ignore_index": -100}),
        F.mse_loss: ("mse", {}),
        F.binary_cross_entropy_with_logits: ("bce_logits", {}),
        F.binary_cross_entropy: ("bce", {}),
    }.get(loss_fn)


def output_hessian(loss_fn: Callable, outputs: Tensor, targets) -> OutputHessian:
    """The product with the output-space loss Hessian of one batch (closed form when known)."""
    kind = _loss_kind(loss_fn)
    f = outputs.detach()
    if kind is None:
        return _autograd(loss_fn, outputs, targets)
    name, options = kind
    if name == "ce":
        if targets.is_floating_point() or f.ndim < 2:  # probability targets or unbatched logits
            return _autograd(loss_fn, outputs, targets)
        return _cross_entropy(f, targets, options["ignore_index"])
    if name == "mse":
        return _diagonal(torch.full_like(f, 2.0 / f.numel()))
    if name == "bce_logits":
        s = torch.sigmoid(f)
        return _diagonal(s * (1 - s) / f.numel())
    y = targets.to(f.dtype)
    return _diagonal((y / f**2 + (1 - y) / (1 - f) ** 2) / f.numel())
