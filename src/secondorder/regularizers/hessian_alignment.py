r"""Hessian alignment across training environments (Hemati, Zhang, Estiri & Chen, ICCV 2023).

"Understanding Hessian Alignment for Domain Generalization" bounds the transfer measure between two
domains by the spectral norm of the difference of their classifier-head Hessians (plus a gradient
term). Aligning the head Hessians and head gradients of the training environments therefore
targets out-of-distribution generalisation. With :math:`E` environments, per-environment losses
:math:`L_e`, :math:`\bar L = \frac1E\sum_e L_e`, head gradients :math:`g_e = \nabla_{\theta_h} L_e`,
:math:`\bar g = \nabla_{\theta_h}\bar L = \frac1E\sum_e g_e`, and head Hessians :math:`H_e`,
:math:`\bar H = \frac1E\sum_e H_e`, the penalized loss is

.. math::

    \mathcal L = \bar L + \frac1E\sum_{e=1}^E\Big[\alpha\,\|A_e - \mathrm{sg}(\bar A)\|^2
                 + \beta\,\|g_e - \mathrm{sg}(\bar g)\|^2\Big]

where sg is the stop-gradient (``detach_mean=True``, as in the authors' DomainBed code; their
ColoredMNIST script does not detach, which is ``detach_mean=False``: same value; and since
:math:`\sum_e(a_e - \bar a) = 0` when :math:`\bar a` is the average of the :math:`a_e`, the gradient
through :math:`\bar g` and through the Hutchinson :math:`\bar D` vanishes anyway, so the option
changes only HGP's gradient, through :math:`\bar H\bar g`) and the Hessian term :math:`A` is one of

* ``variant="hgp"`` (Hessian-gradient product): :math:`A_e = H_e g_e`, :math:`\bar A = \bar H\bar g`.
  It is computed from the identity :math:`\nabla_\theta\|g\| = Hg/\|g\|` as
  :math:`Hg = \|g\|_\epsilon\,\nabla_\theta\|g\|_\epsilon` with
  :math:`\|g\|_\epsilon = \sqrt{\|g\|^2 + \epsilon}`, :math:`\epsilon = 10^{-16}` (the safety against
  :math:`g = 0`; with it inside the square root the identity stays exact for every :math:`\epsilon`,
  and it is the same product as :math:`\nabla_\theta \tfrac12\|g\|^2`). One double-backward per
  environment and one for the mean.
* ``variant="hutchinson"``: :math:`A_e = D_e = \frac1S\sum_{s=1}^S z_s\odot(H_e z_s)`, the Hutchinson
  estimate of :math:`\mathrm{diag}(H_e)` from Rademacher probes :math:`z_s` (unbiased:
  :math:`\mathbb E[z_iz_j] = \delta_{ij}`). The same probes serve every environment, so
  :math:`\bar D = \frac1E\sum_e D_e` is exactly the estimate for :math:`\bar H` at no extra cost, and
  the differences :math:`D_e - \bar D` carry no probe noise from independent draws. Fresh probes are
  drawn at every call from a private generator (``seed``). The paper's code uses :math:`S = 300`; the
  default here is :math:`S = 20` (cost: :math:`ES` double-backwards per step).

**Why the head only.** For cross-entropy with a linear head :math:`W` on features :math:`\phi`,
:math:`g_e = \mathbb E_e[(p - y)\otimes\phi]` and
:math:`H_e = \mathbb E_e[(\mathrm{diag}\,p - pp^\top)\otimes\phi\phi^\top]`. Matching them matches
error-weighted feature means (IRM/Fish-like) and uncertainty-weighted feature second moments
(CORAL-like), which is where the bound lives, and differentiating only the head twice keeps each
product as cheap as a small fraction of a backward pass. All gradients and products are taken with
respect to the head with ``create_graph=True``, so the penalty still sends gradients into the
featurizer through :math:`\phi`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secondorder import validation
from secondorder.linalg.probes import rademacher_signs
from secondorder.operators.params import ParamSelector, select_parameters

__all__ = ["VARIANTS", "AlignmentParts", "HessianAlignment", "hessian_gradient_product", "head_gradient",
           "hutchinson_diagonal", "rademacher_probes"]

#: The Hessian terms :class:`HessianAlignment` can align.
VARIANTS = ("hgp", "hutchinson")

#: Added to :math:`\|g\|^2` under the square root of the norm-gradient identity.
NORM_EPS = 1e-16

Environment = Union[Tensor, tuple[Tensor, Tensor]]


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _grad(output: Tensor, params: Sequence[Tensor], create_graph: bool, what: str,
          grad_outputs: Tensor | None = None) -> Tensor:
    grads = torch.autograd.grad(output, list(params), grad_outputs=grad_outputs, create_graph=create_graph,
                                retain_graph=True, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError(f"{what} does not depend on the head parameters; select the parameters the loss uses")
    return _flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])


def head_gradient(loss: Tensor, params: Sequence[Tensor], create_graph: bool = True) -> Tensor:
    r"""The flattened gradient :math:`g = \nabla_\theta L` of a scalar ``loss`` w.r.t. ``params``.

    With ``create_graph=True`` (the default) ``g`` is itself differentiable, as the products below
    need. Parameters the loss does not use get zeros; a loss that uses none of them is refused.
    """
    loss = validation.scalar_loss(loss, "head_gradient's input")
    return _grad(loss, params, create_graph, "the loss")


def hessian_gradient_product(grad: Tensor, params: Sequence[Tensor], create_graph: bool = True) -> Tensor:
    r"""The Hessian-gradient product :math:`Hg` from the identity :math:`\nabla_\theta\|g\| = Hg/\|g\|`.

    ``grad`` is a flattened :math:`g = \nabla_\theta L` from :func:`head_gradient` (with its graph).
    Returns :math:`\|g\|_\epsilon\,\nabla_\theta\|g\|_\epsilon` with
    :math:`\|g\|_\epsilon = \sqrt{\|g\|^2 + 10^{-16}}`: one double-backward, exact for every
    :math:`\epsilon` (and zero, not NaN, at :math:`g = 0`).
    """
    norm = torch.sqrt(grad.pow(2).sum() + NORM_EPS)
    return norm * _grad(norm, params, create_graph, "the gradient")


def rademacher_probes(num: int, size: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """A ``[num, size]`` block of independent +-1 entries drawn from ``generator`` only."""
    validation.positive_int(num, "num_probes")
    return rademacher_signs(num, size, generator, device).to(dtype)


def hutchinson_diagonal(grad: Tensor, params: Sequence[Tensor], probes: Tensor, create_graph: bool = True) -> Tensor:
    r"""The Hutchinson diagonal :math:`\frac1S\sum_s z_s\odot(Hz_s)` for the ``[S, P]`` ``probes``.

    ``grad`` is a flattened :math:`g = \nabla_\theta L` with its graph; each :math:`Hz_s` is one
    double-backward :math:`\nabla_\theta(g^\top z_s)` (batched over the probes where vmap allows). For Rademacher probes the estimate is unbiased;
    averaged over all :math:`2^P` sign patterns it is exactly :math:`\mathrm{diag}(H)`.
    """
    if probes.dim() != 2 or probes.shape[1] != grad.numel():
        raise ValueError(f"probes must have shape [S, {grad.numel()}] (one row per probe), got {tuple(probes.shape)}")
    try:  # all probes in one vmapped double-backward (2-3x faster on the experiment's MLP)
        products = torch.autograd.grad(grad, list(params), grad_outputs=probes, is_grads_batched=True,
                                       create_graph=create_graph, retain_graph=True, allow_unused=True)
    except RuntimeError:  # an operation without a batching rule: one double-backward per probe
        pass
    else:
        if all(h is None for h in products):
            raise ValueError("the gradient does not depend on the head parameters; select the parameters the loss uses")
        flat = torch.cat([probes.new_zeros(probes.shape[0], p.numel()) if h is None else h.reshape(probes.shape[0], -1)
                          for h, p in zip(products, params)], 1)
        return (probes * flat).mean(0)
    total = torch.zeros_like(grad)
    for z in probes:
        total = total + z * _grad(grad, params, create_graph, "the gradient", grad_outputs=z)
    return total / probes.shape[0]


@dataclass(frozen=True)
class AlignmentParts:
    r"""The terms of one :class:`HessianAlignment` evaluation, as floats for logging.

    ``erm`` is :math:`\bar L`; ``hessian_penalty`` and ``gradient_penalty`` are the unweighted
    :math:`\frac1E\sum_e\|A_e-\bar A\|^2` and :math:`\frac1E\sum_e\|g_e-\bar g\|^2`; ``penalty`` is
    ``weight * (alpha * hessian_penalty + beta * gradient_penalty)``; ``total = erm + penalty``;
    ``env_losses`` the :math:`L_e`.
    """

    erm: float
    hessian_penalty: float
    gradient_penalty: float
    penalty: float
    total: float
    env_losses: tuple[float, ...]


class HessianAlignment:
    r"""Hessian and gradient alignment of a classifier head across environments (see the module docs).

    Args:
        model: the network; only used to find the head parameters and, for ``(inputs, targets)``
            environments, to compute the outputs.
        head: the head parameters, by exact name or module prefix (``"fc"``, ``("fc.weight",
            "fc.bias")``) or a ``(name, parameter) -> bool`` filter, as for the curvature
            operators (:func:`~secondorder.operators.params.select_parameters`, which also names the
            near misses of a wrong name).
        alpha: weight of the Hessian term (DomainBed defaults: 1e-4 for HGP, 1e-3 for Hutchinson).
        beta: weight of the gradient term (DomainBed default 5e-3).
        variant: ``"hgp"`` (:math:`H_eg_e`) or ``"hutchinson"`` (the probe estimate of
            :math:`\mathrm{diag}\,H_e`).
        num_probes: Rademacher probes per call for ``"hutchinson"`` (the paper: 300).
        detach_mean: stop the gradient through the mean terms :math:`\bar A` and :math:`\bar g` (it
            changes only HGP's gradient; see the module docs).
        seed: seed of the private probe generator (the global RNG is never used).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar, for ``(inputs, targets)`` environments.

    Calling it on a sequence of environments, each a scalar loss :math:`L_e` (built from the model,
    so that it depends on the head) or an ``(inputs, targets)`` batch, returns
    ``(penalized_loss, parts)``: the differentiable
    :math:`\bar L + w\,\frac1E\sum_e[\alpha\|A_e-\mathrm{sg}\bar A\|^2 + \beta\|g_e-\mathrm{sg}\bar g\|^2]`
    for the call's ``weight`` :math:`w` (default 1; for penalty annealing) and an
    :class:`AlignmentParts`. Batches are concatenated and passed through the model in one forward
    (so BatchNorm statistics would be shared across environments).

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> align = HessianAlignment(net, head="2", alpha=1e-3, beta=1e-2)
    >>> envs = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> loss, parts = align(envs)
    >>> loss.backward()
    >>> net[0].weight.grad is not None and parts.total == loss.item()
    True

    """

    def __init__(
        self,
        model: nn.Module,
        head: ParamSelector,
        alpha: float = 1e-4,
        beta: float = 5e-3,
        variant: str = "hgp",
        num_probes: int = 20,
        detach_mean: bool = True,
        seed: int = 0,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    ):
        if head is None:
            raise ValueError("head must name the classifier-head parameters (a name, a module prefix or a filter)")
        self.model = model
        chosen = select_parameters(model, head)
        self.head_names: list[str] = [n for n, _ in chosen]
        self.head: list[nn.Parameter] = [p for _, p in chosen]
        self.alpha = validation.non_negative(alpha, "alpha")
        self.beta = validation.non_negative(beta, "beta")
        self.variant = validation.one_of(variant, "variant", VARIANTS)
        self.num_probes = validation.positive_int(num_probes, "num_probes")
        if not isinstance(detach_mean, bool):
            raise TypeError(f"detach_mean must be a bool, got {detach_mean!r}")
        self.detach_mean = detach_mean
        self.loss_fn = loss_fn
        self.generator = torch.Generator(device=self.head[0].device)
        self.generator.manual_seed(validation.seed(seed))

    @property
    def num_head_parameters(self) -> int:
        """The number of scalar head parameters :math:`P`."""
        return sum(p.numel() for p in self.head)

    def environment_losses(self, envs: Sequence[Environment]) -> list[Tensor]:
        """The scalar losses :math:`L_e`: given ones checked, batches passed through the model."""
        envs = list(envs)
        if len(envs) < 1:
            raise ValueError("HessianAlignment needs at least one environment")
        if all(isinstance(e, Tensor) for e in envs):
            return [validation.scalar_loss(e, f"environment {i}") for i, e in enumerate(envs)]
        if all(isinstance(e, (tuple, list)) and len(e) == 2 for e in envs):
            xs = [e[0] for e in envs]
            sizes = [x.shape[0] for x in xs]
            outputs = torch.split(self.model(torch.cat(xs)), sizes)
            return [validation.scalar_loss(self.loss_fn(out, e[1]), f"environment {i} (loss_fn)")
                    for i, (out, e) in enumerate(zip(outputs, envs))]
        raise TypeError("environments must all be scalar loss tensors or all (inputs, targets) pairs")

    def hessian_terms(self, grads: Sequence[Tensor], mean_grad: Tensor) -> tuple[list[Tensor], Tensor]:
        r"""The :math:`A_e` for the environments' gradients and :math:`\bar A` for the mean gradient."""
        keep = not self.detach_mean
        if self.variant == "hgp":
            per_env = [hessian_gradient_product(g, self.head) for g in grads]
            return per_env, hessian_gradient_product(mean_grad, self.head, create_graph=keep)
        probes = rademacher_probes(self.num_probes, mean_grad.numel(), self.generator, mean_grad.dtype,
                                   mean_grad.device)
        per_env = [hutchinson_diagonal(g, self.head, probes) for g in grads]
        return per_env, torch.stack(per_env).mean(0)

    def __call__(self, envs: Sequence[Environment], weight: float = 1.0) -> tuple[Tensor, AlignmentParts]:
        weight = validation.non_negative(weight, "weight")
        losses = self.environment_losses(envs)
        erm = torch.stack(losses).mean()
        grads = [_grad(L, self.head, True, f"environment {i}'s loss") for i, L in enumerate(losses)]
        mean_grad = torch.stack(grads).mean(0)
        terms, mean_term = self.hessian_terms(grads, mean_grad)
        if self.detach_mean:
            mean_grad, mean_term = mean_grad.detach(), mean_term.detach()
        hess = torch.stack([(a - mean_term).pow(2).sum() for a in terms]).mean()
        grad = torch.stack([(g - mean_grad).pow(2).sum() for g in grads]).mean()
        penalty = weight * (self.alpha * hess + self.beta * grad)
        total = erm + penalty
        parts = AlignmentParts(erm=erm.item(), hessian_penalty=hess.item(), gradient_penalty=grad.item(),
                               penalty=penalty.item(), total=total.item(),
                               env_losses=tuple(L.item() for L in losses))
        return total, parts
