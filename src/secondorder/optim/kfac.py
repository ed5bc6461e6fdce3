r"""K-FAC as a drop-in optimizer (Martens & Grosse 2015; the knobs of the seeds' large-batch study,
Ma et al. 2019, and of the PyTorch implementations it used).

Every step takes the gradient :math:`g` of the closure's loss; on factor steps (every
``factor_every`` steps, the first one included) it also forms each layer's Kronecker factors
:math:`A, S` (:mod:`secondorder.operators.kfac`: sampled-label ``"mc"`` factors, one extra
backward from the optimizer's generator, or ``"empirical"`` ones from the loss's own backward)
and keeps exponential averages :math:`M \leftarrow \beta M + (1-\beta) M_{\text{new}}` (``factor_decay``
:math:`\beta`, the first factors taken as they are); every ``inverse_every`` steps it inverts the
factored-Tikhonov damped factors, :math:`(S + \frac{\sqrt\lambda}\pi I)^{-1}` and
:math:`(A + \pi\sqrt\lambda I)^{-1}`. The update of a layer is

.. math:: v = (S + \tfrac{\sqrt\lambda}{\pi} I)^{-1}\,\bar G\,(A + \pi\sqrt\lambda I)^{-1},\qquad
          \nu = \min\Big(1, \sqrt{\kappa / (\eta^2 \textstyle\sum_{\text{layers}}\langle v, \bar G\rangle)}\Big),

(:math:`\bar G` the gradient of the joint weight and bias, :math:`\kappa` ``kl_clip``), then the
weight decay :math:`w` outside the clip (as the reference implementations do) and heavy-ball
momentum: :math:`b \leftarrow \mu b + \nu v + w\bar W`, :math:`\theta \leftarrow \theta - \eta b`.
Parameters outside Linear and convolution layers, excluded with ``params=``, take the same momentum
step on their plain gradient (plus weight decay) and are listed in ``plain_parameters``.

The closure returns ``(loss, logits)``: the batch's mean loss and the model's ``[batch, outputs]``
outputs it came from (the sampled labels are drawn from them); no ``backward``.

Data-parallel (``distributed="auto"``): every step sums, over the ranks in one bucketed
all-reduce, the sample-weighted gradients :math:`n_r g_r`, the losses and the sample counts
:math:`n_r`, and on factor steps the factors' sums :math:`\sum_{n\in r}\bar a\bar a^\top` and
:math:`n_r S_r`, each divided by :math:`N = \sum_r n_r` after it (shards may differ in size). With
``fisher="mc"`` the labels are drawn for the concatenated batch and each rank takes its shard's
(the generator is the same on every rank; one more small all-reduce, of the shard sizes, on
factor steps). So the step is the single process's step on the concatenated batch and every rank
keeps identical factors, inverses and parameters.

Where the inverses are computed (``inverse_placement``; ``"spread"`` is kfac-pytorch's
communication-optimized strategy, which shares inverses rather than preconditioned gradients,
trading communication for inversion work): ``"replicated"`` (default) inverts every layer
on every rank and communicates nothing more; ``"spread"`` assigns each layer to one rank (greedily
by the cost :math:`d_A^3 + d_S^3` of its eigendecompositions, the most expensive first, to the
least-loaded rank: :func:`spread_layers`), each rank inverts its own layers only, and the inverse
factors travel in one bucketed all-reduce of every layer's :math:`(A^{-1}, S^{-1})`, each rank
contributing its layers' and zeros elsewhere. Adding zeros is exact, so every rank holds the same
bits as the inverting rank, equal to the replicated inverses: about :math:`1/W` of the inversion
work per rank for one all-reduce of the inverses' size on inverse steps. In a world of one both
are the same.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn

from secondorder import validation
from secondorder.distributed.reducer import Reducer, check_option, digest, reducer_for
from secondorder.operators.kfac import (
    Capture,
    KFACOperator,
    KroneckerFactors,
    check_logits,
    damped_inverse,
    output_factors,
    supported_layers,
)
from secondorder.operators.output_hessians import _loss_kind
from secondorder.operators.params import make_blocks, select_parameters
from secondorder.optim.base import agree_once, check_generator, check_groups, checked_loss, rescale
from secondorder.optim.subsampled import flat

FISHERS = ("mc", "empirical", "ggn")
PLACEMENTS = ("replicated", "spread")


class KFAC(torch.optim.Optimizer):
    r"""K-FAC (module docstring).

    Args:
        model: the network (its Linear, Conv1d and Conv2d layers are preconditioned).
        loss_fn: the loss (``outputs, targets) -> mean``, for the sampled labels: cross-entropy
            (default), BCE with logits or MSE.
        lr, momentum, weight_decay: the SGD-momentum step on the preconditioned gradient.
        damping: :math:`\lambda` of the factored Tikhonov damping (1e-3).
        kl_clip: :math:`\kappa` of the KL clipping (1e-3; ``None`` turns it off).
        factor_every, inverse_every: steps between factor updates (10) and inversions (100).
        factor_decay: :math:`\beta` of the factors' running averages (0.95).
        fisher: ``"mc"`` (sampled labels, the true Fisher), ``"empirical"``, or ``"ggn"`` (exact
            Gauss-Newton factors, one backward per output; for the losses whose output Hessian
            needs no targets: cross-entropy without ignored labels, MSE, BCE with logits).
        params: which parameters to precondition (default all; a layer K-FAC does not cover
            must be excluded here, by name; it then gets the plain momentum step).
        seed: the generator of the sampled labels.
        grad_scaler: a ``torch.amp.GradScaler``: the loss is scaled before differentiating and
            gradient and factors unscaled; an overflow skips the step and backs the scale off.
        distributed: ``"auto"``, True, False or a reducer.
        inverse_placement: ``"replicated"`` (every rank inverts every layer) or ``"spread"``
            (each layer on one rank, the inverses shared in one all-reduce; module docstring).

    """

    def __init__(self, model: nn.Module, loss_fn: Callable | None = None, *, lr: float = 0.01, damping: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 0.0, kl_clip: float | None = 1e-3,
                 factor_every: int = 10, inverse_every: int = 100, factor_decay: float = 0.95, fisher: str = "mc",
                 params=None, seed: int = 0, grad_scaler=None, distributed: bool | str | Reducer = "auto",
                 inverse_placement: str = "replicated") -> None:
        validation.non_negative(lr, "lr")
        validation.positive_finite(damping, "damping (the factored Tikhonov lambda)")
        validation.fraction(momentum, "momentum")
        validation.non_negative(weight_decay, "weight_decay")
        if kl_clip is not None:
            validation.positive_finite(kl_clip, "kl_clip")
        validation.fraction(factor_decay, "factor_decay")
        self.factor_every = validation.positive_int(factor_every, "factor_every")
        self.inverse_every = validation.positive_int(inverse_every, "inverse_every")
        self.fisher = validation.one_of(fisher, "fisher", FISHERS)
        self.inverse_placement = validation.one_of(inverse_placement, "inverse_placement", PLACEMENTS)
        named = select_parameters(model, params)
        self.layers = supported_layers(model, [p for _, p in named], [n for n, _ in named])
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        chosen = {id(p) for _, p in named}
        everything = [p for p in model.parameters() if p.requires_grad]
        super().__init__(everything, dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                                          kl_clip=kl_clip, factor_decay=factor_decay))
        layer_params = [p for _, m in self.layers for p in m.parameters(recurse=False)]
        if {id(p) for p in layer_params} != chosen:
            raise ValueError("K-FAC preconditions a layer's weight and bias together; select both or neither")
        self.preconditioned = layer_params
        self.plain_parameters = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in chosen]
        names = {id(p): n for n, p in model.named_parameters()}
        self.blocks = make_blocks([(names[id(p)], p) for p in layer_params], "module")
        self.distributed = check_option(distributed)
        self.seed = validation.seed(seed)
        device = layer_params[0].device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.num_steps = self.num_good_steps = 0
        self.factors: list[KroneckerFactors] | None = None
        self.inverse: KFACOperator | None = None
        self._agreed_world: int | None = None

    # ---- the step ------------------------------------------------------------------------
    def step(self, closure: Callable | None = None) -> Tensor:  # type: ignore[override]
        """One step; ``closure()`` returns ``(loss, logits)`` without calling ``backward``."""
        if not callable(closure):
            raise ValueError("KFAC computes its own gradient and factors: call step(closure) with closure() "
                             "returning (loss, logits), without calling backward")
        params = self.param_groups[0]["params"]
        reducer = reducer_for(self.distributed)
        if reducer.distributed:
            self._handshake(reducer, params)
        state = self.generator.get_state()
        try:
            return self._step(closure, params, reducer)
        except BaseException:
            self.generator.set_state(state)
            raise

    def _step(self, closure: Callable, params: list[Tensor], reducer: Reducer) -> Tensor:
        step = self.num_steps + 1
        factor_step = (step - 1) % self.factor_every == 0
        capture = Capture(self.layers)
        with capture if factor_step else nullcontext(), torch.enable_grad():
            out = closure()
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError("the KFAC closure must return (loss, logits): the mean loss and the outputs it came from")
        loss = checked_loss(out[0], step)
        logits = check_logits(out[1], f"the closure at step {step}")
        n = logits.shape[0]
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        empirical = factor_step and self.fisher == "empirical"
        wrt = list(params) + (capture.outputs if empirical else [])
        grads = torch.autograd.grad(self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss, wrt,
                                    allow_unused=True,
                                    retain_graph=factor_step and not empirical)
        spread = reducer.distributed  # one process: no sample weights, the gradient is the mean already
        gradient = flat(grads[: len(params)], params)
        local = [gradient * (n / scale) if spread else gradient / scale if scale != 1.0 else gradient]
        if factor_step:
            if empirical:
                S = capture.output_factors(grads[len(params):], float(n) * n / scale**2)
            else:
                S = output_factors(capture, logits, self.loss_fn, self.fisher, self._placeholder(logits), 1,
                                   self.generator, **self._label_rows(reducer, n, logits.device))
            local += [t for pair in zip(capture.input_factors(), S) for t in pair]
        tail = torch.tensor([float(loss.detach()) * n, float(n)], dtype=local[0].dtype, device=local[0].device)
        summed = reducer.sum(local + [tail], what="KFAC gradient and factors")
        total = float(summed[-1][1])
        mean_loss = summed[-1][0] / total
        g = summed[0] / total if spread else summed[0]
        new = [t / total for t in summed[1:-1]]
        sums = [t.sum(dtype=torch.float64) for t in (g, *new)]  # NaN or inf propagate; float64 cannot overflow
        finite = bool(torch.isfinite(torch.stack(sums)).all())  # one check, one synchronisation
        if not math.isfinite(float(mean_loss)):
            raise FloatingPointError(f"the loss at step {step} is {float(mean_loss)}; parameters were not changed")
        if not finite:
            if self.grad_scaler is not None:  # the scaled derivatives overflowed: skip, back off
                self.num_good_steps = rescale(self.grad_scaler, scale, True, self.num_good_steps)
                return mean_loss
            raise FloatingPointError(f"the gradient or the K-FAC factors at step {step} are not finite; "
                                     "parameters were not changed")
        self._apply(step, params, g, new if factor_step else None, reducer)
        if self.grad_scaler is not None:
            self.num_good_steps = rescale(self.grad_scaler, scale, False, self.num_good_steps)
        return mean_loss

    def _label_rows(self, reducer: Reducer, n: int, device: torch.device) -> dict[str, int]:
        """Where this rank's ``n`` rows lie in the concatenated batch the labels are drawn for
        (``"mc"`` only: the other factors draw nothing, and need no shard sizes).
        """
        if self.fisher != "mc":
            return {}
        counts = [c[0] for c in reducer.counts(n, device=device, what="K-FAC batch sizes")]
        return {"offset": sum(counts[: reducer.rank]), "total": sum(counts)}

    def _placeholder(self, logits: Tensor) -> Tensor:
        """Targets for the closed-form output Hessians, which do not depend on them (class 0, or the outputs)."""
        if _loss_kind(self.loss_fn) is None and self.fisher == "ggn":
            raise ValueError("fisher='ggn' in KFAC needs nn.CrossEntropyLoss, nn.MSELoss or nn.BCEWithLogitsLoss "
                             "(mean reduction): their output Hessians do not depend on the targets")
        ce = isinstance(self.loss_fn, nn.CrossEntropyLoss) or self.loss_fn is torch.nn.functional.cross_entropy
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device) if ce else logits.detach()

    def _apply(self, step: int, params: list[Tensor], g: Tensor, new: list[Tensor] | None,
               reducer: Reducer) -> None:
        """Factors, inverses and the momentum step (only after every check passed; the factors and
        inverses are assigned together once the inverses' collective, if any, returned).
        """
        group = self.param_groups[0]
        factors = self.factors if new is None else self._averaged(new, group["factor_decay"])
        assert factors is not None, "factors exist from the first step"
        inverse = self.inverse
        if inverse is None or (step - 1) % self.inverse_every == 0:
            inverse = self._inverted(factors, group["damping"], reducer)
        self.factors, self.inverse = factors, inverse
        grads = dict(zip(map(id, params), torch.split(g, [p.numel() for p in params])))
        same = len(params) == len(self.preconditioned) and all(a is b for a, b in zip(params, self.preconditioned))
        G = g if same else torch.cat([grads[id(p)] for p in self.preconditioned])
        V = self.inverse @ G
        directions = dict(zip(map(id, self.preconditioned), torch.split(V, [p.numel() for p in self.preconditioned])))
        nu = 1.0
        if group["kl_clip"] is not None:
            quadratic = float(V @ G) * group["lr"] ** 2
            nu = min(1.0, math.sqrt(group["kl_clip"] / quadratic)) if quadratic > 0 else 1.0
        self.num_steps = step
        with torch.no_grad():
            for p in params:
                d = directions.get(id(p), grads[id(p)]).view_as(p)
                scale_d = nu if id(p) in directions else 1.0
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = d * scale_d
                else:
                    buf.mul_(group["momentum"]).add_(d, alpha=scale_d)
                if group["weight_decay"]:
                    buf.add_(p, alpha=group["weight_decay"])
                self.state[p]["momentum_buffer"] = buf
                p.add_(buf, alpha=-group["lr"])

    def _averaged(self, new: list[Tensor], decay: float) -> list[KroneckerFactors]:
        """The running averages of the factors with the step's ``new`` ones (the first factors as they are)."""
        pairs = [(new[2 * i], new[2 * i + 1]) for i in range(len(self.layers))]
        if self.factors is not None:
            pairs = [(torch.lerp(old.A, A, 1 - decay), torch.lerp(old.S, S, 1 - decay))
                     for old, (A, S) in zip(self.factors, pairs)]
        return self._factors(pairs)

    def _inverted(self, factors: list[KroneckerFactors], damping: float, reducer: Reducer) -> KFACOperator:
        """The damped inverse of ``factors``: inverted here (``"replicated"``), or each layer by its
        rank of :func:`spread_layers` and summed over the ranks, zeros elsewhere (``"spread"``).
        """
        if self.inverse_placement == "replicated":
            return KFACOperator.from_factors(self.preconditioned, factors, self.blocks).inverse(damping)
        owners = spread_layers([f.A.shape[0] ** 3 + f.S.shape[0] ** 3 for f in factors], reducer.size)
        local: list[Tensor] = []
        for f, owner in zip(factors, owners):  # this rank's layers inverted, zeros for the others'
            mine = damped_inverse(f, damping) if owner == reducer.rank else \
                replace(f, A=torch.zeros_like(f.A), S=torch.zeros_like(f.S))
            local += [mine.A, mine.S]
        summed = reducer.sum(local, what="KFAC inverses")
        inverted = [replace(f, A=A, S=S) for f, A, S in zip(factors, summed[0::2], summed[1::2])]
        return KFACOperator.from_factors(self.preconditioned, inverted, self.blocks)

    def _factors(self, pairs: list[tuple[Tensor, Tensor]]) -> list[KroneckerFactors]:
        """The layers' :class:`KroneckerFactors` of ``(A, S)`` pairs in layer order."""
        index = {id(p): i for i, p in enumerate(self.preconditioned)}
        return [KroneckerFactors(name, index[id(m.weight)], index[id(m.bias)] if m.bias is not None else None,
                                 A=A, S=S) for (name, m), (A, S) in zip(self.layers, pairs)]

    # ---- data parallelism and checkpoints ------------------------------------------------------
    def _handshake(self, reducer: Reducer, params: list[Tensor]) -> None:
        """Check once per world (and after loading a state) that every rank runs the same optimizer
        on the same layers (different layers would all-reduce buffers of different sizes).
        """
        agree_once(self, reducer, lambda: {
            "optimizer": "KFAC", "parameters": [(tuple(p.shape), str(p.dtype)) for p in params],
            "preconditioned layers": [name for name, _ in self.layers],
            "hyperparameters": {k: v for k, v in self.param_groups[0].items() if k != "params"},
            "settings": {"factor_every": self.factor_every, "inverse_every": self.inverse_every,
                         "fisher": self.fisher, "inverse_placement": self.inverse_placement, "seed": self.seed},
            "steps": (self.num_steps, self.num_good_steps),
            "generator state": digest(self.generator.get_state()),
            "loss scale": float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0,
        })

    def state_dict(self) -> dict:
        out = super().state_dict()
        pairs = lambda fs: None if fs is None else [(f.A, f.S) for f in fs]  # noqa: E731
        out["second_order"] = {"optimizer": "KFAC", "num_steps": self.num_steps, "num_good_steps": self.num_good_steps,
                               "generator": self.generator.get_state(), "factors": pairs(self.factors),
                               "inverse": pairs(self.inverse.factors if self.inverse is not None else None)}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state of :meth:`state_dict` after checking writer, groups, counters, generator and factor shapes."""
        extra, _ = check_groups("KFAC", self.param_groups, state_dict)
        for counter in ("num_steps", "num_good_steps"):
            validation.non_negative_int(extra.get(counter), f"the state_dict's {counter}")
        check_generator(self.generator, extra.get("generator"))
        factors, inverse = (self._checked_factors(extra.get(k), k) for k in ("factors", "inverse"))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "second_order"})
        self.num_steps, self.num_good_steps = extra["num_steps"], extra["num_good_steps"]
        self.generator.set_state(extra["generator"])
        self.factors = factors
        self.inverse = None if inverse is None else KFACOperator.from_factors(self.preconditioned, inverse, self.blocks)
        self._agreed_world = None

    def _checked_factors(self, saved: Any, what: str) -> list[KroneckerFactors] | None:
        if saved is None:
            return None
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.layers):
            raise ValueError(f"the state_dict's {what} do not have one (A, S) pair for each of the "
                             f"{len(self.layers)} layers")
        for (name, m), (A, S) in zip(self.layers, saved):
            weight = cast(Tensor, m.weight)
            d_out, d_in = weight.shape[0], weight[0].numel() + (m.bias is not None)
            if tuple(A.shape) != (d_in, d_in) or tuple(S.shape) != (d_out, d_out):
                raise ValueError(f"the state_dict's {what} of layer {name!r} are {list(A.shape)} and {list(S.shape)}, "
                                 f"the layer needs [{d_in}, {d_in}] and [{d_out}, {d_out}]: saved on another model")
        return self._factors(list(saved))


def spread_layers(costs: list[int], ranks: int) -> list[int]:
    """The rank that inverts each layer of ``inverse_placement="spread"``: greedily, the most
    expensive layer first (ties in layer order), each to the least-loaded rank (the lowest on
    ties). The same on every rank, which all pass the same ``costs``.
    """
    owners, load = [0] * len(costs), [0] * ranks
    for k in sorted(range(len(costs)), key=lambda k: -costs[k]):
        owners[k] = min(range(ranks), key=lambda r: load[r])
        load[owners[k]] += costs[k]
    return owners
