r"""How the top Hessian eigenvalue and the maximal stable learning rate scale with the batch size.

Granziol, Zohren and Roberts ("Learning rates as a function of batch size: a random matrix theory
approach to neural network training", JMLR 2022) model the mini-batch Hessian as the data-set Hessian
plus a noise matrix whose variance falls as :math:`1/B`. Its outliers are pushed outward,
:math:`\lambda_B \approx \lambda + P\sigma^2/(B\lambda)`, so the largest mini-batch eigenvalue exceeds
the full-data one by a term :math:`\propto 1/B`; since SGD is stable up to about
:math:`2/\lambda_{\max}(H_B)`, its maximal learning rate grows linearly with :math:`B` while that term
dominates and saturates once :math:`\lambda_B \approx \lambda`; for Adam they derive :math:`\sqrt B`.

:func:`batch_scaling` measures both on a model and data set ``(inputs, targets)``:

* for each batch size :math:`B`, the top eigenvalue (thick-restart Lanczos, certified by its
  residual) of the Hessian of the mean loss on ``num_batches`` independent random mini-batches
  (``B`` distinct samples each), as mean +- standard error over the batches, and the top eigenvalue
  of the full-data Hessian;
* the weighted least-squares fit :math:`\lambda_B \approx c + a\,u_B` (:func:`fit_inverse_batch`)
  with :math:`u_B = 1/B - 1/n`: the noise variance of a mean over :math:`B` of :math:`n` samples
  drawn without replacement is :math:`\propto 1/B - 1/n`, so :math:`u_n = 0` and the full data is
  the point :math:`B = n` of the same law (for :math:`n \gg B` it is the paper's :math:`a/B`). Two
  fits: ``fit`` with :math:`c` free (its intercept, extrapolated to :math:`B = n`, can then be
  compared with the measured :math:`\lambda_{\text{full}}`: ``intercept_z``) and ``fit_fixed``
  with :math:`c = \lambda_{\text{full}}` (one parameter, the paper's statement);
* optionally, per optimizer, the maximal stable learning rate for each :math:`B` by bisection
  (:func:`max_stable_lr`, :func:`lr_scaling`) and the fit :math:`\mathrm{lr}_{\max} \propto B^p`
  (:func:`fit_power_law`; the paper: :math:`p \approx 1` for SGD at small :math:`B`,
  :math:`p \approx 1/2` for Adam).

The caller's model (parameters, buffers, gradients, train/eval mode) and the global RNG are left as
they were: batches come from a private generator seeded by ``seed``, the Hessians restore the model,
and training runs on a deep copy inside a forked RNG. Results are frozen dataclasses that serialize
to JSON and load back exactly (:class:`~secondorder.linalg.results.Serializable`);
:mod:`secondorder.analysis.batch_scaling_plots` draws them.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from secondorder import validation
from secondorder.linalg import eigenvalues
from secondorder.linalg.results import Serializable
from secondorder.operators.curvature import HessianOperator
from secondorder.operators.params import ParamSelector, select_parameters

__all__ = [
    "BatchEigenvalue",
    "BatchScaling",
    "InverseBatchFit",
    "LRScaling",
    "PowerLawFit",
    "StableLR",
    "batch_scaling",
    "fit_inverse_batch",
    "fit_power_law",
    "lr_scaling",
    "max_stable_lr",
]

OptimizerSpec = Union[str, Callable[[list, float], torch.optim.Optimizer]]
"""``"sgd"`` (plain, no momentum), ``"adam"`` (torch's defaults) or ``factory(params, lr)``."""

OPTIMIZERS: dict[str, Callable[[list, float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}

STDERR_FLOOR = 1e-6
"""A batch size's standard error is taken as at least this fraction of its mean in the weights of
:func:`fit_inverse_batch` (its batches agree to rounding when ``B = n``: every batch is the data)."""

LR_BOUNDS = (1e-7, 1e4)
"""The learning rates :func:`max_stable_lr` searches between by default."""

SEED_SPAN = 2**62


# ---- results ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BatchEigenvalue(Serializable):
    r"""The top Hessian eigenvalue at one batch size: ``mean`` +- ``stderr`` over the batches.

    ``values[j]`` is the top eigenvalue of the Hessian of the mean loss on batch ``j`` (``batch_size``
    distinct samples drawn at random), ``residuals[j]`` its Lanczos residual
    :math:`\|Hv-\theta v\|` (an eigenvalue lies within it), ``num_converged`` how many met the
    tolerance; ``stderr`` is the sample standard deviation over :math:`\sqrt{\text{num_batches}}`.
    """

    batch_size: int
    mean: float
    stderr: float
    values: tuple[float, ...]
    residuals: tuple[float, ...]
    num_converged: int
    num_matvecs: int

    @property
    def num_batches(self) -> int:
        """How many mini-batches the mean is over."""
        return len(self.values)


@dataclass(frozen=True, eq=False)
class InverseBatchFit(Serializable):
    r"""The weighted least-squares fit :math:`\lambda_B \approx c + a\,u_B` (:func:`fit_inverse_batch`).

    :math:`u_B = 1/B - 1/n` with ``num_samples`` :math:`= n`, or :math:`1/B` when it is ``None``.
    ``intercept`` is :math:`c` (``intercept_fixed``: set, not fitted; its stderr is then 0),
    ``slope`` is :math:`a`. ``r_squared`` is the weighted :math:`R^2` (against the weighted mean,
    the same for both fits, so a fixed intercept's can only be lower), ``chi2`` the weighted residual
    sum of squares (with ``1/stderr^2`` weights the chi-square, ``dof`` degrees of freedom).
    """

    intercept: float
    intercept_stderr: float
    slope: float
    slope_stderr: float
    r_squared: float
    chi2: float
    dof: int
    intercept_fixed: bool
    num_samples: int | None

    def predict(self, batch_size: float) -> float:
        r"""The fitted :math:`\lambda_B`."""
        u = 1 / batch_size - (0 if self.num_samples is None else 1 / self.num_samples)
        return self.intercept + self.slope * u


@dataclass(frozen=True, eq=False)
class PowerLawFit(Serializable):
    r"""The least-squares fit :math:`\log y = \log C + p \log B` over ``batch_sizes`` (:func:`fit_power_law`).

    ``exponent_stderr`` is :math:`p`'s standard error (``inf`` with two points: no residual to estimate
    it from), ``r_squared`` that of the log-log line.
    """

    exponent: float
    exponent_stderr: float
    coefficient: float
    r_squared: float
    batch_sizes: tuple[int, ...]

    def predict(self, batch_size: float) -> float:
        """The fitted :math:`C B^p`."""
        return self.coefficient * batch_size**self.exponent


@dataclass(frozen=True, eq=False)
class StableLR(Serializable):
    """The maximal stable learning rate of one optimizer at one batch size (:func:`max_stable_lr`).

    ``lr`` is the largest learning rate tried that stayed stable for ``steps`` steps and
    ``lr_diverged`` the smallest that diverged, so the boundary lies between them; with
    ``bracketed`` they are within the relative tolerance. Not bracketed: nothing diverged up to the
    upper bound (``lr`` is that bound, ``lr_diverged`` is ``inf``), or everything diverged down to
    the lower bound (``lr`` is 0). ``trials`` are ``(lr, diverged, steps run)`` in the order tried;
    ``initial_loss`` is the evaluation loss at the start and ``threshold_loss`` the level above
    which a run counts as diverged; ``num_steps`` the optimizer steps of all trials together.
    """

    batch_size: int
    optimizer: str
    lr: float
    lr_diverged: float
    bracketed: bool
    trials: tuple[tuple[float, bool, int], ...]
    initial_loss: float
    threshold_loss: float
    steps: int
    num_steps: int


@dataclass(frozen=True, eq=False)
class LRScaling(Serializable):
    r"""The maximal stable learning rate of one optimizer against the batch size (:func:`lr_scaling`).

    ``fit`` is :math:`\mathrm{lr}_{\max} \propto B^p` over every bracketed batch size and
    ``fit_small`` over the smallest half of them (at least three; ``None`` with fewer than four),
    where the paper expects the clean power (SGD's saturates at large ``B``); ``None`` with fewer
    than two bracketed points.
    """

    optimizer: str
    points: tuple[StableLR, ...]
    fit: PowerLawFit | None
    fit_small: PowerLawFit | None

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes, ascending."""
        return tuple(p.batch_size for p in self.points)

    @property
    def lrs(self) -> tuple[float, ...]:
        """The maximal stable learning rates, by batch size."""
        return tuple(p.lr for p in self.points)


@dataclass(frozen=True, eq=False)
class BatchScaling(Serializable):
    r"""Everything :func:`batch_scaling` measured; ``to_json`` / ``from_json`` round-trip exactly.

    ``eigenvalues[i]`` is batch size ``batch_sizes[i]``; ``full`` the top eigenvalue of the
    full-data Hessian (``num_samples`` samples) with its Lanczos residual; ``fit`` and ``fit_fixed``
    the :math:`c + a(1/B - 1/n)` fits with the intercept free and fixed at ``full``; ``lr`` one
    :class:`LRScaling` per optimizer (empty without). ``num_matvecs`` counts every Hessian-vector
    product (mini-batch and full).
    """

    batch_sizes: tuple[int, ...]
    eigenvalues: tuple[BatchEigenvalue, ...]
    full: float
    full_residual: float
    full_converged: bool
    full_matvecs: int
    num_samples: int
    num_parameters: int
    fit: InverseBatchFit
    fit_fixed: InverseBatchFit
    lr: tuple[LRScaling, ...]
    num_matvecs: int
    seed: int
    seconds: float

    @property
    def intercept_z(self) -> float:
        """How many standard errors the free fit's intercept lies from the measured full-data eigenvalue."""
        se = self.fit.intercept_stderr
        return (self.fit.intercept - self.full) / se if se > 0 else math.nan

    def lr_of(self, optimizer: str) -> LRScaling:
        """The learning-rate scaling of ``optimizer``."""
        for s in self.lr:
            if s.optimizer == optimizer:
                return s
        raise KeyError(f"no learning rates of {optimizer!r}; measured: {[s.optimizer for s in self.lr]}")

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON text (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "BatchScaling":
        """The result :meth:`to_json` wrote."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "BatchScaling":
        """The result :meth:`save` wrote to ``path``."""
        return cls.from_json(Path(path).read_text())


# ---- fits ------------------------------------------------------------------------------------
def _as_floats(values: Sequence[float], name: str, m: int) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != m:
        raise ValueError(f"{name} must have one value per batch size ({m}), got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _checked_sizes(batch_sizes: Sequence[int], at_least: int = 1, name: str = "batch_sizes") -> list[int]:
    try:
        sizes = [validation.positive_int(b, f"every {name} entry") for b in batch_sizes]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {batch_sizes!r}") from None
    if len(set(sizes)) < at_least:
        raise ValueError(f"{name} needs at least {at_least} distinct batch size(s), got {list(batch_sizes)}")
    return sizes


def fit_inverse_batch(
    batch_sizes: Sequence[int],
    values: Sequence[float],
    stderrs: Sequence[float] | None = None,
    *,
    intercept: float | None = None,
    num_samples: int | None = None,
) -> InverseBatchFit:
    r"""Fit :math:`\lambda_B \approx c + a\,u_B` by weighted least squares.

    Args:
        batch_sizes: the :math:`B`.
        values: the measured :math:`\lambda_B`.
        stderrs: their standard errors, for weights :math:`1/\sigma_B^2` (each floored at
            ``STDERR_FLOOR`` times its value, so a batch size measured without spread, as
            :math:`B = n`, pins the line instead of dividing by zero); ``None``: equal weights.
        intercept: fix :math:`c` at this value (fit only :math:`a`); ``None``: fit it.
        num_samples: :math:`n` for :math:`u_B = 1/B - 1/n` (batches drawn without replacement
            from :math:`n` samples, so :math:`u_n = 0`); ``None`` for :math:`u_B = 1/B`.

    Returns:
        :class:`InverseBatchFit`. Standard errors: with ``stderrs``, the weighted fit's covariance
        :math:`(X^\top W X)^{-1}` inflated by :math:`\max(1, \chi^2/\mathrm{dof})` (a line that
        misses the error bars gets wider errors, one within them keeps the measured ones); without,
        scaled by the residual variance; ``inf`` with no degree of freedom left and no ``stderrs``.

    >>> fit = fit_inverse_batch([1, 2, 4, 8], [3 + 8 / b for b in (1, 2, 4, 8)])
    >>> round(fit.intercept, 12), round(fit.slope, 12), fit.r_squared
    (3.0, 8.0, 1.0)

    """
    sizes = _checked_sizes(batch_sizes, 1 if intercept is not None else 2)
    m = len(sizes)
    y = _as_floats(values, "values", m)
    if num_samples is not None:
        n = validation.positive_int(num_samples, "num_samples")
        if max(sizes) > n:
            raise ValueError(f"batch sizes must not exceed num_samples = {n}, got {max(sizes)}")
    u = [1 / b - (0 if num_samples is None else 1 / num_samples) for b in sizes]
    if stderrs is None:
        w = [1.0] * m
    else:
        se = _as_floats(stderrs, "stderrs", m)
        if any(s < 0 for s in se):
            raise ValueError(f"stderrs must be non-negative, got {se}")
        floor = [max(STDERR_FLOOR * abs(v), 1e-300) for v in y]
        w = [1 / max(s, f) ** 2 for s, f in zip(se, floor)]
    S = math.fsum(w)
    y_mean = math.fsum(wi * yi for wi, yi in zip(w, y)) / S
    ss_tot = math.fsum(wi * (yi - y_mean) ** 2 for wi, yi in zip(w, y))
    if intercept is None:
        u_mean = math.fsum(wi * ui for wi, ui in zip(w, u)) / S
        suu = math.fsum(wi * (ui - u_mean) ** 2 for wi, ui in zip(w, u))
        if suu <= 0:
            raise ValueError(f"a free intercept needs at least 2 distinct batch sizes, got {sizes}")
        a = math.fsum(wi * (ui - u_mean) * (yi - y_mean) for wi, ui, yi in zip(w, u, y)) / suu
        c = y_mean - a * u_mean
        var_a, var_c, dof = 1 / suu, 1 / S + u_mean**2 / suu, m - 2
    else:
        c = float(intercept)
        if not math.isfinite(c):
            raise ValueError(f"intercept must be finite, got {intercept!r}")
        suu = math.fsum(wi * ui**2 for wi, ui in zip(w, u))
        if suu <= 0:
            raise ValueError("a fixed intercept needs a batch size below num_samples (u_B = 0 at B = n)")
        a = math.fsum(wi * ui * (yi - c) for wi, ui, yi in zip(w, u, y)) / suu
        var_a, var_c, dof = 1 / suu, 0.0, m - 1
    chi2 = math.fsum(wi * (yi - c - a * ui) ** 2 for wi, ui, yi in zip(w, u, y))
    if stderrs is not None:
        scale = max(1.0, chi2 / dof) if dof > 0 else 1.0
    else:
        scale = chi2 / dof if dof > 0 else math.inf
    if ss_tot > 0:
        r2 = 1 - chi2 / ss_tot
    else:
        r2 = 1.0 if chi2 == 0 else -math.inf
    return InverseBatchFit(intercept=c, intercept_stderr=math.sqrt(var_c * scale) if var_c else 0.0,
                           slope=a, slope_stderr=math.sqrt(var_a * scale), r_squared=r2, chi2=chi2, dof=dof,
                           intercept_fixed=intercept is not None, num_samples=num_samples)


def fit_power_law(batch_sizes: Sequence[int], values: Sequence[float]) -> PowerLawFit:
    r"""Fit :math:`y \approx C B^p` by least squares on :math:`\log y` against :math:`\log B`.

    Every value must be positive and there must be at least two distinct batch sizes; the exponent's
    standard error (residual variance over :math:`\sum (\log B - \overline{\log B})^2`) is ``inf``
    with only two points.

    >>> fit = fit_power_law([8, 16, 32], [0.5 * b ** 0.5 for b in (8, 16, 32)])
    >>> round(fit.exponent, 12), round(fit.coefficient, 12)
    (0.5, 0.5)
    """
    sizes = _checked_sizes(batch_sizes, 2)
    y = _as_floats(values, "values", len(sizes))
    if any(v <= 0 for v in y):
        raise ValueError(f"a power law needs positive values, got {y}")
    lx, ly = [math.log(b) for b in sizes], [math.log(v) for v in y]
    m = len(lx)
    mx, my = math.fsum(lx) / m, math.fsum(ly) / m
    sxx = math.fsum((a - mx) ** 2 for a in lx)
    p = math.fsum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    logc = my - p * mx
    ss_res = math.fsum((b - logc - p * a) ** 2 for a, b in zip(lx, ly))
    ss_tot = math.fsum((b - my) ** 2 for b in ly)
    se = math.sqrt(ss_res / (m - 2) / sxx) if m > 2 else math.inf
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(exponent=p, exponent_stderr=se, coefficient=math.exp(logc), r_squared=r2,
                       batch_sizes=tuple(sizes))


# ---- input checks ----------------------------------------------------------------------------
def _checked_data(data: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
        raise ValueError("data must be an (inputs, targets) pair of tensors with one row per sample, got "
                         f"{type(data).__name__}")
    x, y = data
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
        raise ValueError(f"data: inputs and targets must have the same number of rows, got shapes "
                         f"{list(x.shape)} and {list(y.shape)}")
    if len(x) == 0:
        raise ValueError("data holds no samples")
    return x, y


def _checked_batch_sizes(batch_sizes: Any, n: int, at_least: int) -> list[int]:
    if isinstance(batch_sizes, (int, str)) or not hasattr(batch_sizes, "__iter__"):
        raise ValueError(f"batch_sizes must be a sequence of positive integers, got {batch_sizes!r}")
    sizes = _checked_sizes(list(batch_sizes), at_least)
    big = [b for b in sizes if b > n]
    if big:
        raise ValueError(f"batch sizes {big} exceed the {n} samples of the data (a batch holds distinct samples)")
    return sorted(set(sizes))


def _optimizer(spec: OptimizerSpec) -> tuple[str, Callable[[list, float], torch.optim.Optimizer]]:
    if isinstance(spec, str):
        if spec not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))} or a factory "
                             f"(params, lr) -> Optimizer; got {spec!r}")
        return spec, OPTIMIZERS[spec]
    if not callable(spec):
        raise ValueError(f"optimizer must be 'sgd', 'adam' or a factory (params, lr) -> Optimizer; got {spec!r}")
    return getattr(spec, "__name__", type(spec).__name__), spec


def _checked_selection(model: nn.Module, params: ParamSelector) -> list[tuple[str, nn.Parameter]]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = select_parameters(model, params)
    if sum(p.numel() for _, p in named) < 2:
        raise ValueError("the selected parameters must hold at least 2 entries (a top eigenvalue of a 1 x 1 "
                         "Hessian needs no Lanczos)")
    return named


@dataclass(frozen=True)
class _LRSettings:
    steps: int
    rtol: float
    divergence: float
    lr_bounds: tuple[float, float]
    check_every: int
    eval_batch_size: int


def _lr_settings(steps: Any, rtol: Any, divergence: Any, lr_bounds: Any, check_every: Any,
                 eval_batch_size: Any) -> _LRSettings:
    steps = validation.positive_int(steps, "steps")
    rtol = validation.tolerance(rtol, "rtol")
    divergence = validation.positive_finite(divergence, "divergence")
    if divergence <= 1:
        raise ValueError(f"divergence must be above 1 (a multiple of the initial loss), got {divergence!r}")
    try:
        lo, hi = (validation.positive_finite(v, "lr_bounds") for v in lr_bounds)
    except (TypeError, ValueError):
        raise ValueError(f"lr_bounds must be two positive finite numbers (low, high), got {lr_bounds!r}") from None
    if not lo < hi:
        raise ValueError(f"lr_bounds must be (low, high) with low < high, got {lr_bounds!r}")
    return _LRSettings(steps, rtol, divergence, (lo, hi), validation.positive_int(check_every, "check_every"),
                       validation.positive_int(eval_batch_size, "eval_batch_size"))


# ---- eigenvalues -----------------------------------------------------------------------------
def _chunks(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _top(model: nn.Module, loss_fn: Callable, data: Any, params: ParamSelector, seed: int, tol: float | None,
         max_matvecs: int | None) -> tuple[float, float, bool, int]:
    op = HessianOperator(model, loss_fn, data, params, seed=seed)
    res = eigenvalues(op, 1, "largest", tol=tol, max_matvecs=max_matvecs, seed=seed)
    return float(res.eigenvalues[0]), float(res.residuals[0]), bool(res.converged[0]), res.num_matvecs


def _draw_seed(gen: torch.Generator) -> int:
    return int(torch.randint(SEED_SPAN, (1,), generator=gen))


def _batch_eigenvalue(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor, B: int, num_batches: int,
                      params: ParamSelector, gen: torch.Generator, tol: float | None, max_matvecs: int | None,
                      bar: Any) -> BatchEigenvalue:
    values, residuals, converged, matvecs = [], [], 0, 0
    for _ in range(num_batches):
        idx = torch.randperm(len(x), generator=gen)[:B].to(x.device)
        value, residual, ok, count = _top(model, loss_fn, (x[idx], y[idx]), params, _draw_seed(gen), tol,
                                          max_matvecs)
        values.append(value)
        residuals.append(residual)
        converged += ok
        matvecs += count
        bar.update()
    t = torch.tensor(values, dtype=torch.float64)
    return BatchEigenvalue(batch_size=B, mean=float(t.mean()), stderr=float(t.std()) / math.sqrt(num_batches),
                           values=tuple(values), residuals=tuple(residuals), num_converged=converged,
                           num_matvecs=matvecs)


# ---- learning rates --------------------------------------------------------------------------
def _evaluate(model: nn.Module, loss_fn: Callable, batches: list[tuple[Tensor, Tensor]]) -> float:
    with torch.no_grad():
        total = sum(float(loss_fn(model(xb), yb)) * len(xb) for xb, yb in batches)
    return total / sum(len(xb) for xb, _ in batches)


def _trial(model: nn.Module, names: list[str], loss_fn: Callable, x: Tensor, y: Tensor, order: Tensor,
           factory: Callable, lr: float, threshold: float, settings: _LRSettings,
           evaluation: list[tuple[Tensor, Tensor]], seed: int) -> tuple[bool, int]:
    """Train a copy of ``model`` for ``settings.steps`` steps at ``lr``; ``(diverged, steps run)``."""
    net = copy.deepcopy(model)
    chosen = set(names)
    params = [p for n, p in net.named_parameters() if n in chosen]
    opt = factory(params, lr)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)  # dropout: the same masks at every learning rate
        for t in range(settings.steps):
            idx = order[t]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            if not torch.isfinite(loss):
                return True, t + 1
            loss.backward()
            opt.step()
            if (t + 1) % settings.check_every == 0 or t + 1 == settings.steps:
                value = _evaluate(net, loss_fn, evaluation)
                if not value <= threshold:  # NaN too
                    return True, t + 1
    return False, settings.steps


def _bisect(run: Callable[[float], tuple[bool, int]], start: float, settings: _LRSettings,
            ) -> tuple[float, float, bool, list[tuple[float, bool, int]]]:
    """Bracket the stability boundary from ``start`` (factors of 4 within the bounds), then bisect log lr."""
    low, high = settings.lr_bounds
    trials: list[tuple[float, bool, int]] = []

    def tried(lr: float) -> bool:
        diverged, ran = run(lr)
        trials.append((lr, diverged, ran))
        return diverged

    stable, diverged = 0.0, math.inf
    lr = min(max(start, low), high)
    while True:
        if tried(lr):
            diverged = lr
            if lr <= low or stable > 0:
                break
            lr = max(lr / 4, low)
        else:
            stable = lr
            if lr >= high or diverged < math.inf:
                break
            lr = min(lr * 4, high)
    if stable == 0 or diverged == math.inf:
        return stable, diverged, False, trials
    while diverged > stable * (1 + settings.rtol):
        lr = math.sqrt(stable * diverged)
        if tried(lr):
            diverged = lr
        else:
            stable = lr
    return stable, diverged, True, trials


def _max_stable_lr(model: nn.Module, names: list[str], loss_fn: Callable, x: Tensor, y: Tensor, B: int,
                   name: str, factory: Callable, start: float, settings: _LRSettings, seed: int) -> StableLR:
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(len(x), generator=gen)[:B] for _ in range(settings.steps)]).to(x.device)
    evaluation = _chunks(x, y, settings.eval_batch_size)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        initial = _evaluate(copy.deepcopy(model), loss_fn, evaluation)  # a copy: train-mode BatchNorm updates
    if not (math.isfinite(initial) and initial > 0):
        raise ValueError(f"the initial loss is {initial!r}; divergence is measured as a multiple of it, so it must "
                         "be positive and finite")
    threshold = settings.divergence * initial
    lr, lr_diverged, bracketed, trials = _bisect(
        lambda rate: _trial(model, names, loss_fn, x, y, order, factory, rate, threshold, settings, evaluation, seed),
        start, settings)
    return StableLR(batch_size=B, optimizer=name, lr=lr, lr_diverged=lr_diverged, bracketed=bracketed,
                    trials=tuple(trials), initial_loss=initial, threshold_loss=threshold, steps=settings.steps,
                    num_steps=sum(t[2] for t in trials))


def max_stable_lr(
    model: nn.Module,
    loss_fn: Callable,
    data: tuple[Tensor, Tensor],
    batch_size: int,
    optimizer: OptimizerSpec = "sgd",
    *,
    steps: int = 200,
    rtol: float = 0.05,
    divergence: float = 2.0,
    initial_lr: float = 1e-2,
    lr_bounds: tuple[float, float] = LR_BOUNDS,
    check_every: int = 10,
    eval_batch_size: int = 1024,
    params: ParamSelector = None,
    seed: int = 0,
) -> StableLR:
    r"""The largest learning rate at which ``optimizer`` trains ``model`` for ``steps`` steps without diverging.

    Every trial trains a deep copy of ``model`` from its current state, in its current train/eval
    mode, for ``steps`` steps of ``optimizer`` on fresh random batches of ``batch_size`` distinct
    samples (the same batch sequence, from ``seed``, at every learning rate, so trials differ only
    in the rate). A trial **diverges** when a mini-batch loss is NaN or infinite, or when the mean
    loss over the whole ``data`` (evaluated every ``check_every`` steps and after the last, without
    gradient) exceeds ``divergence`` times its value at the start (default 2: the loss doubled).
    The search starts at ``initial_lr``, multiplies or divides it by 4 until one trial is stable
    and one diverged (within ``lr_bounds``), then bisects :math:`\log \mathrm{lr}` until the two
    are within a factor ``1 + rtol``. On a quadratic, full-batch gradient descent diverges exactly
    above :math:`2/\lambda_{\max}`, and that is what this finds (up to ``rtol`` and the few percent
    that :math:`|1 - \mathrm{lr}\,\lambda|^{\text{steps}}` needs to double the loss).

    Stochastic trials need not be monotone in the learning rate (a lucky batch sequence); the
    bisection finds one boundary point of the given sequence.

    Args:
        model: trained (or initial) network; never changed.
        loss_fn: ``loss_fn(outputs, targets)``, the batch's mean loss.
        data: ``(inputs, targets)`` tensors, one row per sample.
        batch_size: samples per step, at most the number of samples.
        optimizer: ``"sgd"`` (no momentum), ``"adam"`` (torch's defaults) or ``factory(params, lr)``.
        steps: optimizer steps per trial.
        rtol: relative width of the final bracket, ``0 < rtol < 1``.
        divergence: the multiple of the initial loss that counts as divergence, above 1.
        initial_lr: the first learning rate tried.
        lr_bounds: ``(low, high)``: the search stays within them.
        check_every: steps between evaluations of the whole-data loss.
        eval_batch_size: the evaluation's chunk size (memory only).
        params: the parameters trained (default: all trainable); the rest stay fixed.
        seed: the batch sequence and the dropout masks.

    Returns:
        :class:`StableLR`.

    """
    x, y = _checked_data(data)
    B = _checked_batch_sizes([batch_size], len(x), 1)[0]
    name, factory = _optimizer(optimizer)
    settings = _lr_settings(steps, rtol, divergence, lr_bounds, check_every, eval_batch_size)
    start = validation.positive_finite(initial_lr, "initial_lr")
    named = _checked_selection(model, params)
    return _max_stable_lr(model, [n for n, _ in named], loss_fn, x, y, B, name, factory, start, settings,
                          validation.seed(seed))


def _lr_scaling(model: nn.Module, names: list[str], loss_fn: Callable, x: Tensor, y: Tensor, sizes: list[int],
                name: str, factory: Callable, guesses: dict[int, float] | None, initial_lr: float,
                settings: _LRSettings, seed: int, bar: Any) -> LRScaling:
    points: list[StableLR] = []
    for B in sizes:
        if guesses is not None:
            start = guesses[B]
        elif points and points[-1].bracketed:  # the previous size's rate, grown as sqrt(B)
            start = points[-1].lr * math.sqrt(B / points[-1].batch_size)
        else:
            start = initial_lr
        points.append(_max_stable_lr(model, names, loss_fn, x, y, B, name, factory, start, settings, seed))
        bar.update()
    good = [p for p in points if p.bracketed]
    fit = fit_power_law([p.batch_size for p in good], [p.lr for p in good]) if len(good) >= 2 else None
    small = good[:max(3, -(-len(good) // 2))]
    fit_small = fit_power_law([p.batch_size for p in small], [p.lr for p in small]) if len(good) >= 4 else None
    return LRScaling(optimizer=name, points=tuple(points), fit=fit, fit_small=fit_small)


def _progress(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def lr_scaling(
    model: nn.Module,
    loss_fn: Callable,
    data: tuple[Tensor, Tensor],
    batch_sizes: Sequence[int],
    optimizer: OptimizerSpec = "sgd",
    *,
    steps: int = 200,
    rtol: float = 0.05,
    divergence: float = 2.0,
    initial_lr: float = 1e-2,
    lr_bounds: tuple[float, float] = LR_BOUNDS,
    check_every: int = 10,
    eval_batch_size: int = 1024,
    params: ParamSelector = None,
    seed: int = 0,
    progress: bool = False,
) -> LRScaling:
    r""":func:`max_stable_lr` at every batch size (ascending) and the fit :math:`\mathrm{lr}_{\max} \propto B^p`.

    The first search starts at ``initial_lr``, each later one at the previous size's rate times
    :math:`\sqrt{B/B_{\text{prev}}}` (fewer trials; the result does not depend on the start as long as
    the trials are monotone in the rate). Arguments as in :func:`max_stable_lr`.
    """
    x, y = _checked_data(data)
    sizes = _checked_batch_sizes(batch_sizes, len(x), 1)
    name, factory = _optimizer(optimizer)
    settings = _lr_settings(steps, rtol, divergence, lr_bounds, check_every, eval_batch_size)
    start = validation.positive_finite(initial_lr, "initial_lr")
    named = _checked_selection(model, params)
    with _progress(len(sizes), f"max stable lr ({name})", progress) as bar:
        return _lr_scaling(model, [n for n, _ in named], loss_fn, x, y, sizes, name, factory, None, start,
                           settings, validation.seed(seed), bar)


# ---- everything ------------------------------------------------------------------------------
def batch_scaling(
    model: nn.Module,
    loss_fn: Callable,
    data: tuple[Tensor, Tensor],
    batch_sizes: Sequence[int],
    *,
    num_batches: int = 10,
    params: ParamSelector = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    optimizers: Sequence[OptimizerSpec] = ("sgd", "adam"),
    steps: int = 200,
    lr_rtol: float = 0.05,
    divergence: float = 2.0,
    lr_bounds: tuple[float, float] = LR_BOUNDS,
    check_every: int = 10,
    eval_batch_size: int = 1024,
    seed: int = 0,
    progress: bool = False,
) -> BatchScaling:
    r"""The top Hessian eigenvalue against the batch size, its :math:`1/B` fits, and the maximal stable lr.

    Args:
        model: the network, in the mode to differentiate (and train) it in; never changed.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's **mean** loss.
        data: ``(inputs, targets)`` tensors, one row per sample (:math:`n` rows).
        batch_sizes: at least two distinct sizes in ``1..n`` (sorted, duplicates dropped).
        num_batches: mini-batches per size, at least 2 (for a standard error); each holds ``B``
            distinct samples drawn at random, independently of the other batches.
        params: the parameters whose Hessian is taken and which the optimizers train (default:
            all trainable; names, module prefixes or a filter as in :class:`HessianOperator`).
        tol: Lanczos tolerance of :func:`~secondorder.linalg.eigenvalues` (its default: ``None``).
        max_matvecs: Lanczos budget per eigenvalue (its default: ``None``).
        optimizers: ``"sgd"``, ``"adam"`` or factories ``(params, lr) -> Optimizer`` whose maximal
            stable learning rate is measured at every batch size (:func:`max_stable_lr`); ``()``
            skips it (it costs several short training runs per size: ``steps`` steps each, about
            6-9 runs per size with ``lr_rtol = 0.05``). SGD's search starts at
            :math:`2/\bar\lambda_B`, the rate the paper predicts.
        steps: optimizer steps per trial (:func:`max_stable_lr`).
        lr_rtol: relative width of each final learning-rate bracket (``rtol`` of :func:`max_stable_lr`).
        divergence: the multiple of the initial loss that counts as divergence.
        lr_bounds: ``(low, high)`` of the learning-rate search.
        check_every: steps between evaluations of the whole-data loss.
        eval_batch_size: chunk size of the evaluations and of the full-data Hessian (memory only).
        seed: the batches, the Lanczos starts and the training batch sequences.
        progress: progress bars on stderr.

    Returns:
        :class:`BatchScaling`. Bad input raises one ``ValueError`` before any work.

    """
    x, y = _checked_data(data)
    n = len(x)
    sizes = _checked_batch_sizes(batch_sizes, n, 2)
    num_batches = validation.positive_int(num_batches, "num_batches")
    if num_batches < 2:
        raise ValueError(f"num_batches must be at least 2 (for a standard error), got {num_batches}")
    if tol is not None:
        validation.tolerance(tol)
    validation.optional_positive_int(max_matvecs, "max_matvecs")
    if isinstance(optimizers, str):
        optimizers = (optimizers,)
    chosen = [_optimizer(o) for o in optimizers]
    if len({c[0] for c in chosen}) != len(chosen):
        raise ValueError(f"optimizers must have distinct names, got {[c[0] for c in chosen]}")
    settings = _lr_settings(steps, lr_rtol, divergence, lr_bounds, check_every, eval_batch_size)
    seed = validation.seed(seed)
    named = _checked_selection(model, params)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)

    full_seed = _draw_seed(gen)
    full, full_residual, full_ok, full_matvecs = _top(model, loss_fn, _chunks(x, y, settings.eval_batch_size),
                                                      params, full_seed, tol, max_matvecs)
    with _progress(len(sizes) * num_batches, "batch eigenvalues", progress) as bar:
        points = [_batch_eigenvalue(model, loss_fn, x, y, B, num_batches, params, gen, tol, max_matvecs, bar)
                  for B in sizes]
    means, errs = [p.mean for p in points], [p.stderr for p in points]
    fit = fit_inverse_batch(sizes, means, errs, num_samples=n)
    fit_fixed = fit_inverse_batch(sizes, means, errs, intercept=full, num_samples=n)

    lr: list[LRScaling] = []
    names = [name for name, _ in named]
    with _progress(len(sizes) * len(chosen), "max stable lr", progress) as bar:
        for name, factory in chosen:
            guesses = {p.batch_size: 2 / p.mean for p in points} if name == "sgd" and min(means) > 0 else None
            lr.append(_lr_scaling(model, names, loss_fn, x, y, sizes, name, factory, guesses, 1e-2, settings,
                                  seed, bar))
    return BatchScaling(batch_sizes=tuple(sizes), eigenvalues=tuple(points), full=full, full_residual=full_residual,
                        full_converged=full_ok, full_matvecs=full_matvecs, num_samples=n,
                        num_parameters=sum(p.numel() for _, p in named), fit=fit, fit_fixed=fit_fixed,
                        lr=tuple(lr), num_matvecs=full_matvecs + sum(p.num_matvecs for p in points), seed=seed,
                        seconds=time.perf_counter() - start)
