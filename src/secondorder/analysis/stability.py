r"""Linear stability of training: the sharpness and the trace against the learning rate's bounds.

Near a minimum the loss is the quadratic :math:`\tfrac12\delta^\top H\delta`, and an optimizer's step
is a linear map of :math:`\delta` whose iterates stay bounded only if every eigenvalue of
:math:`H` (of :math:`P^{-1}H` for a diagonal preconditioner :math:`P`) is below a bound fixed by the
learning rate :math:`\eta` and the momentum:

* gradient descent: :math:`\lambda_{\max}(H) \le 2/\eta` (the classical bound; Cohen et al.,
  "Gradient descent on neural networks typically occurs at the edge of stability", ICLR 2021,
  show training sits at it);
* heavy-ball momentum :math:`\beta` (``torch.optim.SGD``: :math:`v \leftarrow \beta v + (1-d)g`,
  :math:`\theta \leftarrow \theta - \eta v`): :math:`\lambda_{\max} \le (2+2\beta)/((1-d)\eta)`;
  with Nesterov: :math:`(2+2\beta)/((1+2\beta)(1-d)\eta)`;
* Adam-style exponential-average momentum :math:`m \leftarrow \beta_1 m + (1-\beta_1)g`,
  :math:`\theta \leftarrow \theta - \eta P^{-1}m` (Adam, AdamW, AdaHessian, Sophia):
  :math:`\lambda_{\max}(P^{-1}H) \le (2+2\beta_1)/((1-\beta_1)\eta)`, the **preconditioned
  sharpness** of Cohen et al., "Adaptive gradient methods at the edge of stability" (2022), with
  :math:`P` read from the optimizer's state (the bias corrections folded in, as they do);
* SGD: a minimum is linearly stable for SGD only if :math:`\mathrm{tr}(H) \le 2/\eta` (Wu and Su,
  "The implicit regularization of dynamical stability in stochastic gradient descent", ICML
  2023). For momentum SGD we use the effective rate :math:`\eta(1-d)/(1-\beta)` in this bound (the
  noise-dominated equivalence of momentum and plain SGD), a heuristic the paper does not state.

Every check carries its uncertainty. The top Ritz value :math:`\theta` of Lanczos is a lower bound
of :math:`\lambda_{\max}` (Ritz values lie inside the spectrum), so :math:`\theta` above the bound is
a certain verdict of instability; :math:`\theta + \|Hv-\theta v\|` below it says "stable" under the
usual assumption that Lanczos found the top eigenvalue. The trace uses its 95% interval. A check
whose interval straddles the bound is "undecided". Weight decay is not part of :math:`H`, and
Sophia's clipped coordinates (whose step is :math:`\eta\,\mathrm{sign}(m)`) are outside the linear
analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from secondorder.linalg.eigen import eigenvalues
from secondorder.linalg.results import EigenResult, Serializable, TraceResult
from secondorder.operators.base import CongruenceOperator, LinearOperator
from secondorder.validation import fraction, positive_finite

__all__ = [
    "BoundCheck",
    "Preconditioner",
    "StabilityCheck",
    "check_rate_source",
    "ema_threshold",
    "optimizer_preconditioner",
    "plain_preconditioner",
    "preconditioned_top",
    "preconditioner_for",
    "sgd_threshold",
    "stability_check",
]

LEVEL = 0.95


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    r"""The largest curvature ``torch.optim.SGD`` is linearly stable on:
    :math:`(2+2\beta)/((1-d)\eta)`, or :math:`(2+2\beta)/((1+2\beta)(1-d)\eta)` with Nesterov
    (2/lr for plain gradient descent).
    """
    _check_rate(lr, momentum)
    fraction(dampening, "dampening")
    scale = (1 + 2 * momentum) if nesterov else 1.0
    return (2 + 2 * momentum) / (scale * (1 - dampening) * lr)


def ema_threshold(lr: float, beta1: float) -> float:
    r"""The largest eigenvalue of :math:`P^{-1}H` an exponential-average-momentum method
    (Adam, AdaHessian, Sophia) is linearly stable on: :math:`(2+2\beta_1)/((1-\beta_1)\eta)`
    (38/lr at :math:`\beta_1 = 0.9`).
    """
    _check_rate(lr, beta1)
    return (2 + 2 * beta1) / ((1 - beta1) * lr)


def _check_rate(lr: float, momentum: float) -> None:
    positive_finite(lr, "the learning rate")
    fraction(momentum, "the momentum")


@dataclass(frozen=True)
class Preconditioner:
    r"""An optimizer's step as the linear analysis sees it: :math:`\theta \leftarrow \theta - \eta
    P^{-1}(\text{momentum of } g)`.

    ``diagonal`` is :math:`P` over the analyzed parameters, flattened in their order (``None``:
    the identity, SGD); ``threshold`` the bound on :math:`\lambda_{\max}(P^{-1}H)`;
    ``trace_threshold`` the SGD trace bound (``None`` for adaptive rules, which have none).
    """

    rule: str
    lr: float
    momentum: float
    threshold: float
    diagonal: Tensor | None = None
    trace_threshold: float | None = None


def _sgd(group: dict) -> Preconditioner:
    lr, beta, d, nesterov = group["lr"], group.get("momentum", 0.0), group.get("dampening", 0.0), \
        group.get("nesterov", False)
    rule = "nesterov" if nesterov and beta else "heavy-ball" if beta else "gd"
    return Preconditioner(rule, lr, beta, sgd_threshold(lr, beta, d, nesterov),
                          trace_threshold=2 * (1 - beta) / ((1 - d) * lr))


def _adam(group: dict, state: dict) -> Tensor:
    beta1, beta2 = group["betas"]
    t = float(state["step"])
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    return (1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + group["eps"])


def _adahessian(group: dict, state: dict) -> Tensor:
    beta1, beta2 = group["betas"]
    k, s = group["hessian_power"], max(float(state["curvature_step"]), 1.0)
    return (1 - beta1 ** float(state["step"])) * (
        (state["exp_hessian_diag_sq"].sqrt() / math.sqrt(1 - beta2**s)) ** k + group["eps"])


def _sophia(group: dict, state: dict) -> Tensor:
    return (group["rho"] * state["hessian"]).clamp_min(group["eps"])


def _rmsprop(group: dict, state: dict) -> Tensor:
    v = state["square_avg"]
    if group.get("centered"):
        v = v - state["grad_avg"] ** 2
    return v.sqrt() + group["eps"]


def _adagrad(group: dict, state: dict) -> Tensor:
    return state["sum"].sqrt() + group["eps"]


# state key -> (rule, diagonal, momentum of the group, momentum form: "ema" or "heavy-ball")
_ADAPTIVE = {
    "exp_avg_sq": ("adam", _adam, lambda g: g["betas"][0], "ema"),
    "exp_hessian_diag_sq": ("adahessian", _adahessian, lambda g: g["betas"][0], "ema"),
    "hessian": ("sophia", _sophia, lambda g: g["betas"][0], "ema"),
    "square_avg": ("rmsprop", _rmsprop, lambda g: g.get("momentum", 0.0), "heavy-ball"),
    "sum": ("adagrad", _adagrad, lambda g: 0.0, "heavy-ball"),
}
SUPPORTED = "torch.optim.SGD, Adam, AdamW, RMSprop, Adagrad, secondorder's AdaHessian, SophiaH and SophiaG"


def _kind(state: dict) -> str | None:
    return next((key for key in _ADAPTIVE if key in state), None)


def _resolved(optimizer: Any, parameters: Sequence[Tensor] | None) -> tuple[list[dict], dict]:
    """The groups (hyperparameters, ``params`` as tensors) and the per-tensor state of a live
    optimizer or of its ``state_dict()`` (whose parameter indices ``parameters`` resolves).
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer.param_groups, {p: optimizer.state.get(p, {}) for g in optimizer.param_groups
                                        for p in g["params"]}
    if not (isinstance(optimizer, dict) and "param_groups" in optimizer and "state" in optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer or its state_dict(), got {type(optimizer).__name__}")
    if parameters is None:
        raise ValueError("an optimizer state_dict needs `parameters`: the tensors it was built over, in order "
                         "(usually list(model.parameters()))")
    parameters = list(parameters)
    groups, state = [], {}
    for g in optimizer["param_groups"]:
        if max(g["params"], default=-1) >= len(parameters):
            raise ValueError(f"the optimizer state refers to parameter {max(g['params'])} but only "
                             f"{len(parameters)} parameters were given")
        tensors = [parameters[i] for i in g["params"]]
        groups.append({**g, "params": tensors})
        for i, p in zip(g["params"], tensors):
            s = optimizer["state"].get(i, optimizer["state"].get(str(i), {}))
            for key, value in s.items():
                if isinstance(value, Tensor) and value.ndim and value.shape != p.shape:
                    raise ValueError(f"the optimizer state's {key!r} of parameter {i} has shape {list(value.shape)}, "
                                     f"the parameter {list(p.shape)}: was the optimizer built over these parameters?")
            state[p] = s
    return groups, state


def optimizer_preconditioner(optimizer: Any, params: Sequence[Tensor],
                             parameters: Sequence[Tensor] | None = None) -> Preconditioner:
    """The :class:`Preconditioner` of ``optimizer``'s next step on ``params`` (the analyzed
    parameters, in the operator's order).

    ``optimizer`` is a live optimizer (its current state is read, nothing changed) or its
    ``state_dict()``, whose parameter indices refer to ``parameters`` (the tensors it was built
    over, in order). Supported: SGD (momentum, dampening, Nesterov), Adam/AdamW (amsgrad), RMSprop,
    Adagrad, AdaHessian, SophiaH/G. The analyzed parameters must share one learning rate and
    momentum, and an adaptive optimizer must have taken a step (its denominators exist).
    """
    groups, state = _resolved(optimizer, parameters)
    where = {p: g for g in groups for p in g["params"]}
    missing = [i for i, p in enumerate(params) if p not in where]
    if missing:
        raise ValueError(f"analyzed parameters {missing} are not in the optimizer; give the optimizer that trains them")
    chosen = [where[p] for p in params]
    kinds = {_kind(state[p]) for p in params}
    if len(kinds) > 1 and None in kinds:
        raise ValueError("some analyzed parameters have no optimizer state yet: take at least one step first")
    if len(kinds) > 1:
        raise ValueError(f"the analyzed parameters are trained by different rules {sorted(map(str, kinds))}")
    kind = kinds.pop()
    if kind is None:
        if "momentum" not in chosen[0] or "nesterov" not in chosen[0]:
            name = "this optimizer" if isinstance(optimizer, dict) else type(optimizer).__name__
            raise ValueError(f"no optimizer state to read a stability rule from: {name} has taken no step yet "
                             f"(take at least one step first) or is not supported ({SUPPORTED})")
        rules = [_sgd(g) for g in chosen]
        _one({(r.lr, r.threshold, r.trace_threshold) for r in rules}, "learning rate, momentum, dampening and nesterov")
        return rules[0]
    rule, diagonal, momentum_of, form = _ADAPTIVE[kind]
    _one({(g["lr"], momentum_of(g)) for g in chosen}, "learning rate and momentum")
    lr, beta = chosen[0]["lr"], momentum_of(chosen[0])
    threshold = ema_threshold(lr, beta) if form == "ema" else sgd_threshold(lr, beta)
    P = torch.cat([diagonal(g, state[p]).detach().flatten() for g, p in zip(chosen, params)])
    return Preconditioner(rule, float(lr), float(beta), threshold, P.to(torch.float64))


def _one(values: set, what: str) -> None:
    if len(values) != 1:
        raise ValueError(f"the analyzed parameters must share one {what}: the optimizer's groups differ "
                         f"({sorted(values)}); analyze the groups separately (params=...)")


@dataclass(frozen=True, eq=False)
class BoundCheck(Serializable):
    """One quantity against its stability bound: ``value`` in ``[low, high]`` (see the module
    docstring), ``threshold``, and the ``verdict``: ``"stable"`` (``high <= threshold``),
    ``"unstable"`` (``low > threshold``) or ``"undecided"``.
    """

    quantity: str
    value: float
    low: float
    high: float
    threshold: float
    verdict: str

    @classmethod
    def of(cls, quantity: str, value: float, low: float, high: float, threshold: float) -> "BoundCheck":
        """The check of ``value`` in ``[low, high]`` against ``threshold``."""
        verdict = "unstable" if low > threshold else "stable" if high <= threshold else "undecided"
        return cls(quantity, float(value), float(low), float(high), float(threshold), verdict)

    @classmethod
    def eigenvalue(cls, quantity: str, top: EigenResult, threshold: float) -> "BoundCheck":
        """The top Ritz value (a lower bound of the top eigenvalue) plus its residual."""
        theta, r = float(top.eigenvalues[0]), float(top.residuals[0])
        return cls.of(quantity, theta, theta, theta + r, threshold)

    @property
    def ratio(self) -> float:
        """``value / threshold``: 1 is the edge of stability."""
        return self.value / self.threshold


@dataclass(frozen=True, eq=False)
class StabilityCheck(Serializable):
    r"""The stability verdicts at a learning rate: ``sharpness`` is :math:`\lambda_{\max}(H)`
    against the bound of ``rule`` without its preconditioner (for an adaptive rule: against GD's
    2/lr at the same rate, for reference), ``trace`` is :math:`\mathrm{tr}(H)` against SGD's bound
    (``None`` for adaptive rules), ``preconditioned`` is :math:`\lambda_{\max}(P^{-1}H)` against
    the rule's bound (``None`` without a preconditioner).
    """

    rule: str
    lr: float
    momentum: float
    sharpness: BoundCheck
    trace: BoundCheck | None
    preconditioned: BoundCheck | None = None

    @property
    def verdict(self) -> str:
        """The verdict that governs the optimizer: the preconditioned one if there is one, else the sharpness."""
        return (self.preconditioned or self.sharpness).verdict


def stability_check(top: EigenResult, trace: TraceResult, preconditioner: Preconditioner,
                    preconditioned_top: EigenResult | None = None) -> StabilityCheck:
    """The :class:`StabilityCheck` from the measured top eigenvalue and trace of :math:`H` (and
    of :math:`P^{-1/2}HP^{-1/2}` for an adaptive ``preconditioner``).
    """
    pre = preconditioner
    if (pre.diagonal is None) != (preconditioned_top is None):
        raise ValueError("give the preconditioned top eigenvalue exactly when the preconditioner is not the identity")
    plain = pre.threshold if pre.diagonal is None else sgd_threshold(pre.lr)
    sharp = BoundCheck.eigenvalue("lambda_max(H)" if pre.diagonal is None else "lambda_max(H) vs GD at this lr",
                                  top, plain)
    tr = None
    if pre.trace_threshold is not None:
        lo, hi = trace.confidence_interval(LEVEL)
        tr = BoundCheck.of("tr(H)", trace.value, lo, hi, pre.trace_threshold)
    prec = None if preconditioned_top is None else BoundCheck.eigenvalue("lambda_max(P^-1 H)", preconditioned_top,
                                                                         pre.threshold)
    return StabilityCheck(pre.rule, pre.lr, pre.momentum, sharp, tr, prec)


def plain_preconditioner(lr: float, momentum: float = 0.0) -> Preconditioner:
    """SGD's (heavy-ball ``momentum``) :class:`Preconditioner` without an optimizer object."""
    return _sgd({"lr": lr, "momentum": momentum, "dampening": 0.0, "nesterov": False})


def preconditioned_top(op: LinearOperator, preconditioner: Preconditioner, seed: int = 0,
                       **eig_kwargs: Any) -> EigenResult | None:
    r"""The top eigenvalue of :math:`P^{-1/2}HP^{-1/2}` (the spectrum of :math:`P^{-1}H`) by
    Lanczos on :class:`~secondorder.operators.CongruenceOperator`; ``None`` for the identity.
    """
    if preconditioner.diagonal is None:
        return None
    return eigenvalues(CongruenceOperator(op, preconditioner.diagonal.rsqrt()), 1, "largest", seed=seed,
                       **eig_kwargs)


def check_rate_source(lr: float | None, momentum: float, optimizer: Any) -> None:
    """Where the stability checks take their learning rate from: ``lr`` (valid, with ``momentum``)
    or ``optimizer``, not both.
    """
    if optimizer is not None and lr is not None:
        raise ValueError("give the learning rate or the optimizer (whose learning rate is read), not both")
    if lr is not None:
        _check_rate(lr, momentum)


def preconditioner_for(op: Any, lr: float | None = None, momentum: float = 0.0, optimizer: Any = None,
                       parameters: Sequence[Tensor] | None = None) -> Preconditioner | None:
    """The preconditioner of ``optimizer`` on ``op``'s parameters, or plain SGD's at ``lr`` and
    ``momentum``, or ``None`` when neither is given (no stability check).
    """
    check_rate_source(lr, momentum, optimizer)
    if optimizer is not None:
        return optimizer_preconditioner(optimizer, op.params, parameters)
    return None if lr is None else plain_preconditioner(lr, momentum)
