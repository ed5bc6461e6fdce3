r"""A learning-rate and momentum learner from the Hessian's spectrum edges (Granziol, Zohren & Roberts,
"Learning rates as a function of batch size", JMLR 2022: their stochastic-Lanczos-quadrature learner).

The authors' exact algorithm is not public; :class:`SLQLearningRate` is the learner of the research
note (``shared/research/algorithms-applications.md`` §7). Every ``every`` optimizer steps it takes a
batch, runs ``num_steps`` Lanczos steps of the Hessian of its mean loss
(:class:`~secondorder.HessianOperator`, :func:`~secondorder.linalg.spectral_density`: the Ritz
values :math:`\theta_j` and Gauss weights :math:`w_j` of stochastic Lanczos quadrature) and reads the
spectrum's edges:

* :math:`\lambda_{\max} = \max_j \theta_j`, the top Ritz value (a lower bound of the batch Hessian's
  top eigenvalue, usually accurate to a few digits after 20 steps: Lanczos finds the extremes first);
* :math:`\lambda_{\min}`, with ``lambda_min="quantile"`` (default) the ``quantile`` (5 %) point of
  the *positive part* of the SLQ density: the Ritz values above ``positive_tol * lambda_max``, with
  their weights renormalized to sum to one (pooled over the probes), and :math:`\lambda_{\min}` the
  smallest of them whose cumulative weight reaches ``quantile``; with ``"ritz"`` the smallest of
  those Ritz values. The quantile is the default because a network's Hessian has a bulk of
  near-zero eigenvalues: one stray small positive Ritz value then moves the quantile only as much
  as its weight, and the rule reads the density rather than one node. ``positive_tol`` (1e-4) is the
  line below which a Ritz value counts as zero (rounding, or the bulk at zero) and not as the edge.

For a quadratic with spectrum in :math:`[\mu, L]` = :math:`[\lambda_{\min}, \lambda_{\max}]` the
heavy ball :math:`w_{t+1} = w_t - \alpha\nabla f(w_t) + \rho\,(w_t - w_{t-1})` converges fastest
(Polyak 1964) at

.. math::
    \alpha^\star = \Big(\frac{2}{\sqrt{L} + \sqrt{\mu}}\Big)^2, \qquad
    \rho^\star = \Big(\frac{\sqrt\kappa - 1}{\sqrt\kappa + 1}\Big)^2, \qquad \kappa = L/\mu,

where every eigen-mode's error contracts by :math:`\sqrt{\rho^\star} = (\sqrt\kappa-1)/(\sqrt\kappa+1)`
per step. Note :math:`\alpha^\star = (1 + \sqrt{\rho^\star})^2 / L`: the optimum lies on the line
:math:`\alpha = (1+\sqrt\rho)^2/L` on which the top mode's two roots coincide (critical damping).

**Clamps.** ``lr_cap="gd"`` (the default, the note's "safe clamp") caps
:math:`\alpha \le 2/\lambda_{\max}` with this refresh's top Ritz value: for
:math:`\rho^\star > 0.17` this cuts the optimum (up to a factor 2 as :math:`\rho \to 1`), and in exchange
the step stays a factor :math:`1+\rho` inside the heavy ball's stability edge, room for the
curvature to grow between refreshes. On the digits MLP (``experiments/slq_learner.py``) the
uncapped optimum collapsed training to chance; the capped learner trained. ``lr_cap="optimal"``
is the cap discussed next. ``max_momentum`` (0.99) caps :math:`\rho`; it is applied as a cap on the condition
number, :math:`\kappa \le \kappa_{\max} = ((1+\sqrt{\rho_{\max}})/(1-\sqrt{\rho_{\max}}))^2`
(1.6e5 for 0.99), so that :math:`(\alpha, \rho)` stays the heavy-ball optimum of the spectrum
:math:`[L/\kappa_{\max}, L]`: a near-zero :math:`\lambda_{\min}` cannot drive the pair to
:math:`\rho \to 1`, :math:`\alpha \to 4/L`. The learning rate is capped by
:math:`\alpha \le (1+\sqrt\rho)^2/\lambda_{\max}` with this refresh's (unsmoothed) top Ritz value:
the largest step at which the top mode still contracts at the design rate :math:`\sqrt\rho`. The
cap ``2 / lambda_max`` is the right one only without momentum: the heavy ball's stability bound is
:math:`\alpha < 2(1+\rho)/\lambda_{\max}` (the top mode's root reaches :math:`-1` there), and
:math:`\alpha^\star` lies inside it, :math:`2(1+\rho^\star) - \alpha^\star L = 4\mu/(\sqrt L+\sqrt\mu)^2
> 0`, but above ``2 / L`` as soon as :math:`\rho^\star > (\sqrt2-1)^2 \approx 0.17`, so capping at
``2 / L`` would cut the optimum for every :math:`\kappa > 5.8`. The margin of
:math:`(1+\sqrt\rho)^2/L` below the stability edge shrinks as :math:`\rho \to 1` (the ratio
:math:`2(1+\rho)/(1+\sqrt\rho)^2` is 2 at :math:`\rho=0`, 1.0000063 at 0.99): with high momentum the
heavy ball tolerates almost no underestimate of :math:`\lambda_{\max}`, which is why the cap uses the
freshest measurement, not the smoothed one.

**Smoothing.** With ``smoothing`` :math:`\beta > 0` the edges are averaged geometrically across
refreshes, :math:`\log\bar\lambda \leftarrow \beta\log\bar\lambda + (1-\beta)\log\lambda` (the first
refresh starts the average), and :math:`(\alpha, \rho)` are the optimum of the smoothed edges
(times ``lr_factor`` for :math:`\alpha`), then capped as above. Smoothing the edges, not
:math:`\alpha` and :math:`\rho` separately, keeps the pair on the optimum of one spectrum.

**Without momentum** (``mode="gradient"``): one Hessian-vector product along the batch gradient
:math:`g` gives the exact line-search step of the batch's quadratic model,
:math:`\alpha = g^\top g / g^\top H g` (the authors' ``lr_sgd.py``); the record's ``lambda_max`` and
``lambda_min`` are both the Rayleigh quotient :math:`r = g^\top Hg/g^\top g`, so :math:`\alpha = 1/r`
is the formula above with :math:`\kappa = 1`, :math:`\rho = 0`. It sets the learning rate only (the
optimizer's momentum is left as it is: with momentum :math:`\rho` the step is about
:math:`\alpha/(1-\rho)`). :math:`\alpha` can exceed ``2 / lambda_max``; on a quadratic it always
decreases the loss (steepest descent with exact line search).

**Driving an optimizer.** After every refresh (and at every :meth:`step`, so that nothing else
overwrites them) every parameter group gets ``lr = alpha``; in ``"momentum"`` mode also
``momentum = rho`` when the group has ``"momentum"`` (SGD, RMSprop) and ``betas = (rho, beta2)``
when it has ``"betas"`` (Adam, AdamW, NAdam, ...). An optimizer with neither is refused in
``"momentum"`` mode. :math:`(\alpha, \rho)` are optimal for the heavy ball, i.e. for
``torch.optim.SGD`` with ``dampening=0`` and ``nesterov=False`` (other settings are refused): its
form :math:`v_{t+1} = \rho v_t + g_t`, :math:`w_{t+1} = w_t - \alpha v_{t+1}` gives
:math:`w_{t+1} - w_t = -\alpha g_t + \rho(w_t - w_{t-1})` (and :math:`v_1 = g_0` is the heavy ball
started at rest), the same iterates for the same constant :math:`\alpha, \rho`; when
:math:`\alpha` changes at a refresh, SGD's form rescales the momentum term by
:math:`\alpha_{new}/\alpha_{old}` once. For Adam-like optimizers the values are a heuristic:
:math:`\alpha` is a step in the units of the raw gradient, which Adam normalizes away, and
``betas[0]`` is an average's decay, not a heavy-ball coefficient; scale with ``lr_factor``. All
groups get the same values: the spectrum is that of the Hessian over all the optimizer's parameters.

**The batch.** :meth:`step` refreshes at steps ``0, every, 2 every, ...`` (call it once per training
step, before ``optimizer.step()``, so the first step already uses a learned rate). The refresh's
batch is the one passed to :meth:`step` or :meth:`refresh` (an ``(inputs, targets)`` pair, or a list
of them, as :class:`~secondorder.HessianOperator` takes), otherwise ``batch_size`` samples drawn
without replacement from ``data`` (``(inputs, targets)`` tensors) with the learner's own generator
(a fresh batch each refresh, as the note's :math:`B_H`; the training batch is often too small, and
reusing it couples the rate to that batch's noise). The curvature is taken with the model in eval
mode (``eval_mode=True``: BatchNorm on its running statistics, no dropout), every module's mode
restored afterwards; the global RNG is never touched (probes and batches come from a private
generator seeded by ``seed``, saved in :meth:`state_dict`, so a resumed run is bitwise the same).

Cost per refresh: ``num_steps * num_probes`` Hessian-vector products (one in ``"gradient"`` mode,
plus one gradient), on the refresh batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from secondorder import validation
from secondorder.linalg.density import spectral_density
from secondorder.operators import HessianOperator

__all__ = ["SLQLearningRate", "SLQRecord"]

MODES = ("momentum", "gradient")
LR_CAPS = ("gd", "optimal")
LAMBDA_MIN_RULES = ("quantile", "ritz")


@dataclass(frozen=True)
class SLQRecord:
    r"""One refresh of :class:`SLQLearningRate`.

    Attributes:
        step: optimizer steps taken before the refresh (0 for the first).
        lambda_max: this refresh's top edge, the top Ritz value (``"gradient"`` mode: the Rayleigh
            quotient :math:`g^\top Hg/g^\top g`).
        lambda_min: this refresh's low edge by the ``lambda_min`` rule (``"gradient"``: the Rayleigh
            quotient); NaN when the batch showed no positive curvature.
        kappa: the condition number behind the values set: of the smoothed edges, capped at
            ``kappa_max`` (1 in ``"gradient"`` mode).
        lr: the learning rate set.
        momentum: the momentum set (0 in ``"gradient"`` mode, where the optimizer's is kept).
        matvecs: Hessian-vector products of this refresh.
        kept: the batch showed no positive curvature, so the previous values were kept.

    """

    step: int
    lambda_max: float
    lambda_min: float
    kappa: float
    lr: float
    momentum: float
    matvecs: int
    kept: bool = False


def _momentum_of_kappa(kappa: float) -> float:
    s = math.sqrt(kappa)
    return ((s - 1) / (s + 1)) ** 2


class SLQLearningRate:
    r"""Sets an optimizer's learning rate and momentum from the Hessian's spectrum; see the module docstring.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over parameters of ``model``.
        model: the network; called as ``model(inputs)``.
        loss_fn: ``loss_fn(outputs, targets)``, the batch's **mean** loss.
        data: ``(inputs, targets)`` tensors to draw refresh batches from, or ``None`` (then every
            refresh needs a batch passed to :meth:`step`).
        every: optimizer steps between refreshes (the first is at step 0).
        num_steps: Lanczos steps per probe (capped at the parameter count, where Lanczos is exact).
        num_probes: SLQ start vectors (their densities are pooled for the quantile).
        batch_size: samples drawn from ``data`` per refresh (at most all of them).
        max_micro_batch: the drawn batch is split into chunks of at most this many samples
            (the Hessian of their size-weighted mean, the same matrix); ``None``: one chunk.
        mode: ``"momentum"`` (Lanczos, sets lr and momentum) or ``"gradient"`` (one HVP along the
            gradient, sets lr only).
        lambda_min: ``"quantile"`` or ``"ritz"`` (the rule for the low edge).
        quantile: the level of the ``"quantile"`` rule, in (0, 1).
        positive_tol: Ritz values at or below ``positive_tol * lambda_max`` are not positive, in (0, 1).
        max_momentum: cap of the momentum, in [0, 1).
        smoothing: EMA weight of the previous (log) edges, in [0, 1) (default 0.5); 0 uses each refresh alone.
        lr_factor: multiplies the optimum learning rate before the cap.
        lr_cap: ``"gd"`` (the note's safe clamp, default): :math:`\alpha \le 2/\lambda_{\max}`, a factor
            :math:`1+\rho` inside the heavy ball's stability edge; ``"optimal"``:
            :math:`\alpha \le (1+\sqrt\rho)^2/\lambda_{\max}`, which keeps the exact optimum
            :math:`\alpha^\star` on a quadratic but leaves almost no margin (see the module docstring).
        eval_mode: take the curvature with the model in eval mode (each module's mode restored).
        seed: seeds the private generator of batches and probes.

    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: Callable,
        data: Any = None,
        *,
        every: int = 100,
        num_steps: int = 20,
        num_probes: int = 1,
        batch_size: int = 128,
        max_micro_batch: int | None = None,
        mode: str = "momentum",
        lambda_min: str = "quantile",
        quantile: float = 0.05,
        positive_tol: float = 1e-4,
        max_momentum: float = 0.99,
        smoothing: float = 0.5,
        lr_factor: float = 1.0,
        lr_cap: str = "gd",
        eval_mode: bool = True,
        seed: int = 0,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.every = validation.positive_int(every, "every (optimizer steps between refreshes)")
        self.num_steps = validation.positive_int(num_steps, "num_steps (Lanczos steps)")
        self.num_probes = validation.positive_int(num_probes, "num_probes")
        self.batch_size = validation.positive_int(batch_size, "batch_size")
        self.max_micro_batch = validation.optional_positive_int(max_micro_batch, "max_micro_batch")
        self.mode = validation.one_of(mode, "mode", MODES)
        self.lambda_min_rule = validation.one_of(lambda_min, "lambda_min", LAMBDA_MIN_RULES)
        self.quantile = validation.tolerance(quantile, "quantile")
        self.positive_tol = validation.tolerance(positive_tol, "positive_tol")
        self.max_momentum = validation.fraction(max_momentum, "max_momentum")
        self.smoothing = validation.fraction(smoothing, "smoothing")
        self.lr_factor = validation.positive_finite(lr_factor, "lr_factor")
        self.lr_cap = validation.one_of(lr_cap, "lr_cap", LR_CAPS)
        self.eval_mode = bool(eval_mode)
        self.seed = validation.seed(seed)
        self.optimizer, self.model, self.loss_fn = optimizer, model, loss_fn
        self.data = self._checked_data(data)
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        in_model = {id(p) for p in model.parameters()}
        if not ids <= in_model:
            raise ValueError(f"{len(ids - in_model)} of the optimizer's parameters are not parameters of the model; "
                             "the learner needs the Hessian over exactly the parameters the optimizer trains")
        self._param_ids = frozenset(ids)
        if self.mode == "momentum":
            self._check_momentum_groups()
        root = math.sqrt(self.max_momentum)
        self.kappa_max = ((1 + root) / (1 - root)) ** 2
        self.generator = torch.Generator().manual_seed(self.seed)
        self.steps = 0
        self.lr: float | None = None
        self.momentum: float | None = None
        self._edges: tuple[float, float] | None = None  # smoothed (lambda_max, lambda_min)
        self._records: list[SLQRecord] = []

    # ---- checks ------------------------------------------------------------------------------
    @staticmethod
    def _checked_data(data: Any) -> tuple[Tensor, Tensor] | None:
        if data is None:
            return None
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
            raise TypeError("data must be (inputs, targets) tensors to draw refresh batches from, or None "
                            f"(pass the batch to step()); got {type(data).__name__}")
        if data[0].ndim == 0 or data[0].shape[0] != data[1].shape[0] or data[0].shape[0] == 0:
            raise ValueError(f"data: inputs and targets must share a non-empty first (sample) dimension, got "
                             f"{tuple(data[0].shape)} and {tuple(data[1].shape)}")
        return data[0], data[1]

    def _check_momentum_groups(self) -> None:
        name = type(self.optimizer).__name__
        for i, group in enumerate(self.optimizer.param_groups):
            if "momentum" not in group and "betas" not in group:
                raise ValueError(f"mode='momentum' sets the momentum, but {name}'s parameter group {i} has neither "
                                 "'momentum' (SGD, RMSprop) nor 'betas' (Adam-like); use an optimizer with momentum "
                                 "or mode='gradient' (learning rate only)")
            if group.get("nesterov", False):
                raise ValueError(f"{name} parameter group {i} has nesterov=True: the learned (lr, momentum) are the "
                                 "heavy ball's optimum; use nesterov=False")
            if group.get("dampening", 0) != 0:
                raise ValueError(f"{name} parameter group {i} has dampening={group['dampening']}: the heavy ball "
                                 "the learned (lr, momentum) are optimal for is SGD with dampening=0")

    # ---- the schedule ------------------------------------------------------------------------
    @property
    def records(self) -> tuple[SLQRecord, ...]:
        """One record per refresh so far (including those before a resume)."""
        return tuple(self._records)

    def step(self, batch: Any = None) -> SLQRecord | None:
        """Call once per training step, before ``optimizer.step()``: refreshes at steps ``0, every,
        2 every, ...`` (on ``batch`` if given, else a batch drawn from ``data``; ``batch`` is ignored
        on other steps) and sets the current values in the optimizer. Returns the refresh's record or ``None``.
        """
        record = self.refresh(batch) if self.steps % self.every == 0 else None
        self._apply()
        self.steps += 1
        return record

    def refresh(self, batch: Any = None) -> SLQRecord:
        """Measure the spectrum now (on ``batch``, or one drawn from ``data``) and set the new values."""
        batch = self._batch(batch)
        seed = int(torch.randint(0, validation.MAX_SEED, (1,), generator=self.generator))
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            if self.eval_mode:
                self.model.eval()
            with torch.enable_grad():
                op = HessianOperator(self.model, self.loss_fn, batch,
                                     params=lambda _, p: id(p) in self._param_ids, seed=seed)
                raw_max, raw_min, matvecs = self._measure(op, seed)
        finally:
            for module, training in modes:
                module.training = training
        record = self._update(raw_max, raw_min, matvecs)
        self._records.append(record)
        self._apply()
        return record

    def _batch(self, batch: Any) -> Any:
        if batch is not None:
            return batch
        if self.data is None:
            raise ValueError(f"step {self.steps} refreshes the learning rate but no batch was given and the learner "
                             "has no data to draw one from: pass step(batch) or data=(inputs, targets)")
        x, y = self.data
        idx = torch.randperm(x.shape[0], generator=self.generator)[:self.batch_size]
        bx, by = x[idx.to(x.device)], y[idx.to(y.device)]
        chunk = self.max_micro_batch
        if chunk is None or chunk >= len(idx):
            return bx, by
        return [(bx[s:s + chunk], by[s:s + chunk]) for s in range(0, len(idx), chunk)]

    def _measure(self, op: HessianOperator, seed: int) -> tuple[float, float, int]:
        """``(lambda_max, lambda_min, products)`` of this refresh; ``lambda_min`` NaN without positive curvature."""
        if self.mode == "gradient":
            _, g = op.loss_and_gradient()
            assert g is not None
            gg = float(g.double() @ g.double())
            if gg == 0:
                return math.nan, math.nan, 0
            with torch.no_grad():
                r = float(g.double() @ (op @ g).double()) / gg
            return r, (r if r > 0 else math.nan), 1
        result = spectral_density(op, self.num_probes, self.num_steps, seed=seed)
        used = result.weights > 0
        nodes = result.nodes[used]
        weights = result.weights[used]
        top = float(nodes.max())
        positive = nodes > self.positive_tol * top
        if not top > 0:
            return top, math.nan, result.num_matvecs
        if self.lambda_min_rule == "ritz":
            return top, float(nodes[positive].min()), result.num_matvecs
        order = torch.argsort(nodes[positive])
        values, mass = nodes[positive][order], weights[positive][order]
        cumulative = torch.cumsum(mass, 0) / mass.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor([self.quantile], dtype=cumulative.dtype)))
        return top, float(values[min(index, len(values) - 1)]), result.num_matvecs

    def _update(self, raw_max: float, raw_min: float, matvecs: int) -> SLQRecord:
        if not (raw_max > 0 and raw_min > 0):
            if self._edges is None:
                raise ValueError(f"the first refresh (step {self.steps}) found no positive curvature on its batch "
                                 f"(lambda_max {raw_max}); the learner needs a locally convex direction to set a rate")
            assert self.lr is not None and self.momentum is not None
            kappa = self._edges[0] / self._edges[1] if self.mode == "momentum" else 1.0
            return SLQRecord(self.steps, raw_max, math.nan, min(kappa, self.kappa_max), self.lr, self.momentum,
                             matvecs, kept=True)
        if self._edges is None or self.smoothing == 0:
            edges = (raw_max, raw_min)
        else:
            b = self.smoothing
            edges = (math.exp(b * math.log(self._edges[0]) + (1 - b) * math.log(raw_max)),
                     math.exp(b * math.log(self._edges[1]) + (1 - b) * math.log(raw_min)))
        self._edges = edges
        kappa = min(max(edges[0] / edges[1], 1.0), self.kappa_max)
        rho = _momentum_of_kappa(kappa) if self.mode == "momentum" else 0.0
        gain = (1 + math.sqrt(rho)) ** 2
        cap = 2.0 if self.lr_cap == "gd" else gain
        self.lr = min(self.lr_factor * gain / edges[0], cap / raw_max)
        self.momentum = rho
        return SLQRecord(self.steps, raw_max, raw_min, kappa, self.lr, rho, matvecs)

    def _apply(self) -> None:
        if self.lr is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
            if self.mode == "momentum":
                if "momentum" in group:
                    group["momentum"] = self.momentum
                else:
                    group["betas"] = (self.momentum, group["betas"][1])

    # ---- saving and resuming -----------------------------------------------------------------
    def _config(self) -> dict:
        return {"every": self.every, "num_steps": self.num_steps, "num_probes": self.num_probes,
                "batch_size": self.batch_size, "max_micro_batch": self.max_micro_batch, "mode": self.mode,
                "lambda_min": self.lambda_min_rule, "quantile": self.quantile, "positive_tol": self.positive_tol,
                "max_momentum": self.max_momentum, "smoothing": self.smoothing, "lr_factor": self.lr_factor,
                "lr_cap": self.lr_cap, "eval_mode": self.eval_mode, "seed": self.seed}

    def state_dict(self) -> dict:
        """Settings, step count, current values, smoothed edges, generator and records (for ``torch.save``)."""
        return {"config": self._config(), "steps": self.steps, "lr": self.lr, "momentum": self.momentum,
                "edges": None if self._edges is None else list(self._edges),
                "generator": self.generator.get_state(), "records": [asdict(r) for r in self._records]}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` of a learner with the same settings (sets the optimizer's values)."""
        keys = {"config", "steps", "lr", "momentum", "edges", "generator", "records"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"not an SLQLearningRate state_dict (expected the keys {sorted(keys)})")
        mine = self._config()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(f"the state was written by a learner with {key}={value!r}, this one has "
                                 f"{key}={mine.get(key)!r}")
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        self.lr, self.momentum = state["lr"], state["momentum"]
        self._edges = None if state["edges"] is None else (float(state["edges"][0]), float(state["edges"][1]))
        self._records = [SLQRecord(**r) for r in state["records"]]
        self._apply()
